"""`RedisStore`: the catalog kept in Redis, so it outlives the catalog process.

Owns the calls to Redis and the translation of Lua replies and Redis failures into refit errors; the
URL format and the key builders are `redis_keys.py`'s. Values are
serialized protobuf (through `refit.catalog.wire`); every mutation is one Lua script from `lua.py`,
whose header documents the key layout. Behaviour matches `MemoryStore` exactly (`stores.base`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from refit.catalog import wire
from refit.catalog.values import Resolved
from refit.errors import CatalogError, CatalogUnavailableError
from refit.types import Claim, ModelMeta, SourceRecord, VersionInfo, VersionState
from refit_server.stores import base, lua, lua_reads
from refit_server.stores.redis_keys import Keys, parse_url

logger = logging.getLogger(__name__)

PERSISTENCE_KEYS = ("appendonly", "appendfsync", "save")


def _info(name: str, version: int, fields: dict[bytes, bytes], ranks: Sequence[bytes]) -> VersionInfo:
    """A VersionInfo from a version hash (HGETALL) and its agents hash's keys."""
    return VersionInfo(
        name=name,
        version=version,
        state=VersionState(fields[b"state"].decode()),
        world_size=int(fields[b"world_size"]),
        published_ranks=tuple(sorted(int(r) for r in ranks)),
        model=wire.model_from_bytes(fields[b"model"]),
        created_at=float(fields[b"created_at"]),
        ready_at=float(fields[b"ready_at"]),
        dead_ranks=tuple(int(r) for r in fields[b"dead"].split(b",")) if fields.get(b"dead") else (),
        failure=fields.get(b"failure", b"").decode(),
    )


class RedisStore:
    """`Store` over one Redis instance; safe to share between threads (redis-py pools connections).

    `keep_retired` as in `stores.base.check_keep_retired`; every catalog server sharing one Redis
    should use the same value (each retire applies its own server's).
    """

    def __init__(self, url: str, *, keep_retired: int | None = base.DEFAULT_KEEP_RETIRED) -> None:
        self.keep_retired = base.check_keep_retired(keep_retired)
        self.config = parse_url(url)
        c = self.config
        self._keys = Keys(c.prefix)
        self._redis = redis.Redis(
            host=c.host,
            port=c.port,
            db=c.db,
            username=c.username,
            password=c.password,
            ssl=c.ssl,
            socket_timeout=c.timeout_s,
            socket_connect_timeout=c.timeout_s,
            # A short retry rides out a reconnect without stalling callers for long when Redis is down.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
        self._claim = self._redis.register_script(lua.CLAIM)
        self._heartbeat = self._redis.register_script(lua.HEARTBEAT)
        self._reap = self._redis.register_script(lua_reads.REAP)
        self._release = self._redis.register_script(lua.RELEASE)
        self._publish = self._redis.register_script(lua.PUBLISH)
        self._retire = self._redis.register_script(lua.RETIRE)
        self._latest = self._redis.register_script(lua_reads.LATEST)
        self._resolve = self._redis.register_script(lua_reads.RESOLVE)
        self._generation = self._redis.register_script(lua_reads.GENERATION)

    def __repr__(self) -> str:
        return f"RedisStore({self.config.where}, prefix={self.config.prefix!r}, keep_retired={self.keep_retired})"

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise CatalogUnavailableError(f"catalog store {self.config.where} is unreachable: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise CatalogError(f"catalog store {self.config.where} failed: {exc}") from exc

    def ping(self) -> None:
        with self._guard():
            self._redis.ping()

    def close(self) -> None:
        self._redis.close()

    def persistence(self) -> dict[str, str] | None:
        """Redis's `appendonly`, `appendfsync` and `save` settings; None when CONFIG is refused
        (disabled or renamed, as managed Redis services do)."""
        try:
            with self._guard():
                pipe = self._redis.pipeline(transaction=False)
                for key in PERSISTENCE_KEYS:
                    pipe.config_get(key)
                replies = pipe.execute()
        except CatalogUnavailableError:
            raise
        except CatalogError as exc:
            logger.debug("cannot read the persistence settings of %s: %s", self.config.where, exc)
            return None
        settings = {}
        for key, reply in zip(PERSISTENCE_KEYS, replies, strict=True):
            value = reply.get(key, reply.get(key.encode()))
            settings[key] = value.decode() if isinstance(value, bytes) else str(value)
        return settings

    def durability_warnings(self) -> list[str]:
        """What makes a Redis restart lose versions (see docs/catalog.md, Durability); [] if nothing."""
        settings = self.persistence()
        if settings is None:
            return [
                f"cannot read the persistence settings of {self.config.where} (CONFIG refused); make sure it "
                "runs with appendonly yes and appendfsync always, or a restart may lose versions"
            ]
        warnings = []
        if settings["appendonly"] != "yes":
            warnings.append(
                f"{self.config.where} runs without an append-only file (appendonly {settings['appendonly']}, "
                f"save {settings['save']!r}): a Redis restart loses the versions and claims written since its "
                "last snapshot; set appendonly yes and appendfsync always"
            )
        elif settings["appendfsync"] != "always":
            warnings.append(
                f"{self.config.where} syncs its append-only file with appendfsync {settings['appendfsync']}: "
                "a crash of its host may lose the last second of writes; appendfsync always loses none"
            )
        return warnings

    def claim(
        self, *, name: str, rank: int, agent_name: str, takeover: bool, now: float, lease_s: float = 0.0
    ) -> Claim:
        args = [rank, agent_name, int(takeover), repr(now), repr(float(lease_s)), name, self._keys.model(name)]
        with self._guard():
            reply = self._claim(keys=[self._keys.claims(name), self._keys.names()], args=args)
        status = reply[0].decode()
        if status == "taken":
            raise base.rank_claimed(name, rank, reply[1].decode(), agent_name)
        if reply[2]:
            logger.warning("%r rank %d taken over by %r from %r", name, rank, agent_name, reply[2].decode())
        return Claim(name=name, rank=rank, agent_name=agent_name, claimed_at=float(reply[1]),
                     lease_s=float(lease_s), lease_expires_at=float(reply[3]))  # fmt: skip

    def heartbeat(self, *, name: str, rank: int, agent_name: str) -> Claim:
        with self._guard():
            reply = self._heartbeat(keys=[self._keys.claims(name)], args=[rank, agent_name, self._keys.model(name)])
        if reply[0] == b"lost":
            raise base.lease_expired(name, rank, agent_name, reply[1].decode() or None)
        return Claim(name=name, rank=rank, agent_name=agent_name, claimed_at=float(reply[1]),
                     lease_s=float(reply[2]), lease_expires_at=float(reply[3]))  # fmt: skip

    def release(self, *, name: str, rank: int, agent_name: str) -> None:
        with self._guard():
            self._release(keys=[self._keys.claims(name)], args=[rank, agent_name, self._keys.model(name)])

    def _reaped(self, names: Sequence[str]) -> redis.client.Pipeline:
        """A MULTI pipeline that first reaps the lapsed leases of `names` (reads queue after it)."""
        pipe = self._redis.pipeline(transaction=True)
        for n in names:
            self._reap(keys=[], args=[self._keys.model(n)], client=pipe)
        return pipe

    def publish(
        self, *, name: str, version: int, world_size: int, model: ModelMeta, source: SourceRecord, now: float
    ) -> VersionInfo:
        k, rank, agent = self._keys, source.rank, source.agent_name
        keys = [
            k.version(name, version),
            k.sources(name, version),
            k.agents(name, version),
            k.claims(name),
            k.versions(name),
            k.names(),
            k.layouts(name, version),
            k.heads(name, version),
            k.pruned(name),
        ]
        record, head, layout = wire.source_encodings(source)
        args = [name, version, world_size, wire.model_to_bytes(model), rank, agent, record, repr(now), layout, head,
                k.model(name)]  # fmt: skip
        with self._guard():
            reply = self._publish(keys=keys, args=args)
        status = reply[0].decode()
        if status == "retired":
            raise base.retired(name, version)
        if status == "failed":
            raise base.failed(name, version, reply[1].decode())
        if status == "conflict":
            raise base.conflict(
                name,
                version,
                stored_world_size=int(reply[1]),
                world_size=world_size,
                stored_model=wire.model_from_bytes(reply[2]),
                model=model,
            )
        if status == "claimed":
            raise base.rank_claimed(name, rank, reply[1].decode(), agent)
        if status == "published":
            raise base.rank_published(name, version, rank, reply[1].decode(), agent)
        state, created_at, ready_at, *ranks = reply[1:]
        return VersionInfo(
            name=name,
            version=version,
            state=VersionState(state.decode()),
            world_size=world_size,
            published_ranks=tuple(sorted(int(r) for r in ranks)),
            model=model,
            created_at=float(created_at),
            ready_at=float(ready_at),
        )

    def get_version(self, *, name: str, version: int) -> VersionInfo:
        with self._guard():
            pipe = self._reaped([name])
            pipe.hgetall(self._keys.version(name, version))
            pipe.hkeys(self._keys.agents(name, version))
            pipe.get(self._keys.pruned(name))
            _, fields, ranks, floor = pipe.execute()
        if not fields:
            raise self._missing(name, version, floor)
        return _info(name, version, fields, ranks)

    def get_state(self, *, name: str, version: int) -> VersionState:
        # The reaper, then one HGET of a short field, in one MULTI round trip; the model bytes stay in
        # Redis. A version hash always has `state` (publish creates it with every field): nil is unknown.
        with self._guard():
            pipe = self._reaped([name])
            pipe.hget(self._keys.version(name, version), "state")
            _, state = pipe.execute()
            if state is None:  # unknown, or deleted by retention (a second read, for misses only)
                floor = self._redis.get(self._keys.pruned(name))
                if floor is not None and version <= int(floor):
                    return VersionState.RETIRED
                raise base.not_found(name, version)
        return VersionState(state.decode())

    def latest(self, *, name: str, state: VersionState) -> VersionInfo | None:
        with self._guard():
            reply = self._latest(
                keys=[self._keys.versions(name)],
                args=[state.value, self._keys.version_prefix(name), self._keys.model(name)],
            )
        if not reply:
            return None
        end = reply.index(b"", 1)  # a hash field or value is never empty; "" separates the agents' ranks
        flat = reply[1:end]
        return _info(name, int(reply[0]), dict(zip(flat[::2], flat[1::2], strict=True)), reply[end + 1 :])

    def list_versions(self, *, name: str | None) -> list[VersionInfo]:
        k = self._keys
        with self._guard():
            names = sorted(n.decode() for n in self._redis.smembers(k.names())) if name is None else [name]
            pipe = self._redis.pipeline(transaction=False)
            for n in names:
                pipe.zrange(k.versions(n), 0, -1)
            numbers = [(n, int(v)) for n, vs in zip(names, pipe.execute(), strict=True) for v in vs]
            # One MULTI for every version, after the reaper: a consistent snapshot, in one round trip.
            pipe = self._reaped(names)
            for n, v in numbers:
                pipe.hgetall(k.version(n, v))
                pipe.hkeys(k.agents(n, v))
            replies = pipe.execute()[len(names) :] if numbers else []
        infos = [
            _info(n, v, fields, ranks)
            for (n, v), fields, ranks in zip(numbers, replies[::2], replies[1::2], strict=True)
            if fields
        ]
        return sorted(infos, key=lambda i: (i.name, i.version))

    def get_sources(self, *, name: str, version: int, ranks: Sequence[int] = ()) -> list[SourceRecord]:
        with self._guard():
            pipe = self._reaped([name])
            pipe.exists(self._keys.version(name, version))
            if ranks:  # only the records asked for leave Redis
                pipe.hmget(self._keys.sources(name, version), sorted(set(ranks)))
            else:
                pipe.hvals(self._keys.sources(name, version))
            pipe.get(self._keys.pruned(name))
            _, exists, blobs, floor = pipe.execute()
        if not exists:
            raise self._missing(name, version, floor)
        return sorted((wire.source_from_bytes(b) for b in blobs if b is not None), key=lambda s: s.rank)

    def resolve(self, *, name: str, version: int | None, known_layout: str, ranks: Sequence[int] = ()) -> Resolved:
        k = self._keys
        # The ranks sit between the fixed arguments and the model's key prefix, which is always last.
        args = [
            "" if version is None else version,
            k.version_prefix(name),
            known_layout,
            *sorted(set(ranks)),
            k.model(name),
        ]
        with self._guard():
            reply = self._resolve(keys=[self._keys.versions(name), self._keys.pruned(name)], args=args)
        if not reply:
            raise base.no_ready(name) if version is None else base.not_found(name, version)
        if reply[0] == b"deleted":
            raise base.deleted(name, version or 0)
        number, omitted = int(reply[0]), reply[1] == b"1"
        n = int(reply[2])
        flat = reply[3 : 3 + n]
        m = int(reply[3 + n])
        ranks, blobs = reply[4 + n : 4 + n + m], reply[4 + n + m :]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        return Resolved(
            info=_info(name, number, fields, ranks),
            sources=tuple(sorted((wire.source_from_bytes(b) for b in blobs), key=lambda s: s.rank)),
            layout_digest=fields.get(b"layout", b"").decode(),
            tensors_omitted=omitted,
        )

    def generation(self, *, name: str) -> str:
        with self._guard():
            n, epoch = self._generation(keys=[], args=[self._keys.model(name)])
        return f"{(epoch or b'-').decode()}:{(n or b'0').decode()}"

    def counts(self) -> base.StoreCounts:
        k = self._keys
        with self._guard():
            names = [n.decode() for n in self._redis.smembers(k.names())]
            pipe = self._redis.pipeline(transaction=False)
            for n in names:
                pipe.zrange(k.versions(n), 0, -1)
                pipe.hlen(k.claims(n))
            replies = pipe.execute() if names else []
            claims = sum(replies[1::2])
            pipe = self._redis.pipeline(transaction=False)
            for n, numbers in zip(names, replies[::2], strict=True):
                for v in numbers:
                    pipe.hget(k.version(n, int(v)), "state")
            states = Counter(VersionState(s.decode()) for s in (pipe.execute() if len(pipe) else []) if s)
        return base.StoreCounts(versions=dict(states), claims=claims)

    @staticmethod
    def _missing(name: str, version: int, floor: bytes | None) -> CatalogError:
        """The error for a version hash that is absent: deleted by retention, or never published."""
        pruned = floor is not None and version <= int(floor)
        return base.deleted(name, version) if pruned else base.not_found(name, version)

    def retire(self, *, name: str, version: int, and_older: bool) -> list[int]:
        with self._guard():
            keep = "" if self.keep_retired is None else self.keep_retired
            reply = self._retire(
                keys=[self._keys.versions(name), self._keys.pruned(name)],
                args=[version, int(and_older), self._keys.version_prefix(name), keep, self._keys.model(name)],
            )
        if reply[0] == b"not_found":
            raise base.not_found(name, version)
        n = int(reply[1])
        changed, deleted = sorted(int(v) for v in reply[2 : 2 + n]), [int(v) for v in reply[2 + n :]]
        if deleted:
            logger.info("%r: deleted retired versions %s (keep_retired=%d)", name, deleted, self.keep_retired)
        return changed
