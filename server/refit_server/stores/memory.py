"""`MemoryStore`: the embedded, in-process catalog store (the default).

One lock guards everything, which makes each operation atomic exactly as the Redis store's Lua
scripts are; catalog traffic is a handful of small calls per version, so contention does not matter.
State dies with the process. Retired versions beyond the newest `keep_retired` are deleted at
retirement (`stores.base` describes retention).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from refit.catalog import wire
from refit.catalog.values import Resolved
from refit.types import Claim, ModelMeta, SourceRecord, VersionInfo, VersionState
from refit_server.stores import base

logger = logging.getLogger(__name__)


@dataclass
class _Version:
    state: VersionState
    world_size: int
    model: ModelMeta
    created_at: float
    ready_at: float = 0.0
    sources: dict[int, SourceRecord] = field(default_factory=dict)
    heads: dict[int, SourceRecord] = field(default_factory=dict)  # the sources without tensors
    layouts: dict[int, str] = field(default_factory=dict)  # rank -> source layout digest
    layout: str = ""  # the version's layout digest; "" until every rank has published
    dead: set[int] = field(default_factory=set)  # READY, but these ranks' publishers lost their lease
    failure: str = ""

    def info(self, name: str, version: int) -> VersionInfo:
        return VersionInfo(
            name=name,
            version=version,
            state=self.state,
            world_size=self.world_size,
            published_ranks=tuple(sorted(self.sources)),
            model=self.model,
            created_at=self.created_at,
            ready_at=self.ready_at,
            dead_ranks=tuple(sorted(self.dead)),
            failure=self.failure,
        )

    def fail(self, reason: str) -> None:
        self.failure = f"{self.failure}; {reason}" if self.failure else reason


class MemoryStore:
    """Thread-safe in-memory `Store`; `clock` (unix seconds) times the leases; `keep_retired` as in
    `stores.base.check_keep_retired`."""

    def __init__(
        self, clock: Callable[[], float] = time.time, *, keep_retired: int | None = base.DEFAULT_KEEP_RETIRED
    ) -> None:
        self.keep_retired = base.check_keep_retired(keep_retired)
        self._lock = threading.Lock()
        self._clock = clock
        self._versions: dict[str, dict[int, _Version]] = {}
        self._claims: dict[str, dict[int, Claim]] = {}
        self._pruned: dict[str, int] = {}  # model -> the highest version number deleted by retention
        self._changes: dict[str, int] = {}  # model -> changes a read could see (see `generation`)
        self._epoch = uuid.uuid4().hex[:12]  # this store's data: a counter never repeats across stores

    def __repr__(self) -> str:
        return f"MemoryStore(keep_retired={self.keep_retired})"

    def size(self) -> int:
        """How many versions the store holds (every model): what retention keeps bounded."""
        with self._lock:
            return sum(len(v) for v in self._versions.values())

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None

    def durability_warnings(self) -> list[str]:
        return []  # in-process by design: its state lives exactly as long as the catalog serving it

    # -- leases ------------------------------------------------------------------------------------

    def _reap(self, name: str) -> None:
        """Drop every lapsed lease of `name` and kill its rank (the rules are in `stores.base`)."""
        now = self._clock()
        claims = self._claims.get(name, {})
        for rank, c in sorted(claims.items()):
            if c.lease_s > 0 and c.lease_expires_at < now:
                del claims[rank]
                self._kill(name, rank, c.agent_name)

    def _changed(self, name: str) -> None:
        self._changes[name] = self._changes.get(name, 0) + 1

    def _kill(self, name: str, rank: int, agent_name: str) -> None:
        reason = base.lease_lost(rank, agent_name)
        logger.warning("%s: %s", name, reason)
        self._changed(name)
        for v in self._versions.get(name, {}).values():
            if v.state is VersionState.STAGING and rank < v.world_size:
                v.state = VersionState.FAILED
                v.fail(reason)
            elif v.state is VersionState.READY and rank not in v.dead:
                part = v.sources.get(rank)
                if part is not None and part.agent_name == agent_name:
                    v.dead.add(rank)
                    v.fail(reason)

    def claim(
        self, *, name: str, rank: int, agent_name: str, takeover: bool, now: float, lease_s: float = 0.0
    ) -> Claim:
        with self._lock:
            self._reap(name)
            claims = self._claims.setdefault(name, {})
            held = claims.get(rank)
            if held is not None and held.agent_name != agent_name and not takeover:
                raise base.rank_claimed(name, rank, held.agent_name, agent_name)
            claimed_at = held.claimed_at if held is not None and held.agent_name == agent_name else now
            expires = self._clock() + lease_s if lease_s > 0 else 0.0
            claims[rank] = Claim(name=name, rank=rank, agent_name=agent_name, claimed_at=claimed_at,
                                 lease_s=lease_s, lease_expires_at=expires)  # fmt: skip
            return claims[rank]

    def heartbeat(self, *, name: str, rank: int, agent_name: str) -> Claim:
        with self._lock:
            self._reap(name)
            held = self._claims.get(name, {}).get(rank)
            if held is None or held.agent_name != agent_name:
                raise base.lease_expired(name, rank, agent_name, held.agent_name if held else None)
            if held.lease_s > 0:
                held = dataclasses.replace(held, lease_expires_at=self._clock() + held.lease_s)
                self._claims[name][rank] = held
            return held

    def release(self, *, name: str, rank: int, agent_name: str) -> None:
        with self._lock:
            self._reap(name)
            claims = self._claims.get(name, {})
            held = claims.get(rank)
            if held is not None and held.agent_name == agent_name:
                del claims[rank]

    def publish(
        self, *, name: str, version: int, world_size: int, model: ModelMeta, source: SourceRecord, now: float
    ) -> VersionInfo:
        rank, agent = source.rank, source.agent_name
        # Hashed outside the lock: the digest depends on nothing but this part.
        _, _, layout = wire.source_encodings(source)
        head = dataclasses.replace(source, tensors=())
        model_bytes = wire.model_to_bytes(model)
        with self._lock:
            self._reap(name)
            v = self._versions.get(name, {}).get(version)
            if v is None and version <= self._pruned.get(name, -1):
                raise base.retired(name, version)  # retired and deleted by retention: still final
            if v is not None:
                if v.state is VersionState.RETIRED:
                    raise base.retired(name, version)
                if v.state is VersionState.FAILED:
                    raise base.failed(name, version, v.failure)
                if v.world_size != world_size or v.model != model:
                    raise base.conflict(
                        name,
                        version,
                        stored_world_size=v.world_size,
                        world_size=world_size,
                        stored_model=v.model,
                        model=model,
                    )
            held = self._claims.get(name, {}).get(rank)
            if held is not None and held.agent_name != agent:
                raise base.rank_claimed(name, rank, held.agent_name, agent)
            if v is not None:
                prev = v.sources.get(rank)
                if prev is not None and prev.agent_name != agent:
                    raise base.rank_published(name, version, rank, prev.agent_name, agent)
            else:
                v = _Version(state=VersionState.STAGING, world_size=world_size, model=model, created_at=now)
                self._versions.setdefault(name, {})[version] = v
            v.sources[rank], v.heads[rank], v.layouts[rank] = source, head, layout
            v.layout = base.version_layout(world_size=world_size, model=model_bytes, layouts=v.layouts)
            # The service guarantees rank < world_size, so a full dict means every rank published.
            if v.state is VersionState.STAGING and len(v.sources) >= world_size:
                v.state, v.ready_at = VersionState.READY, now
            if v.state is VersionState.READY:  # a STAGING part changes no cached (READY) reply
                self._changed(name)
            return v.info(name, version)

    def get_version(self, *, name: str, version: int) -> VersionInfo:
        with self._lock:
            self._reap(name)
            return self._get(name, version).info(name, version)

    def get_state(self, *, name: str, version: int) -> VersionState:
        with self._lock:
            self._reap(name)
            if version not in self._versions.get(name, {}) and version <= self._pruned.get(name, -1):
                return VersionState.RETIRED
            return self._get(name, version).state

    def latest(self, *, name: str, state: VersionState) -> VersionInfo | None:
        with self._lock:
            self._reap(name)
            versions = self._versions.get(name, {})
            for number in sorted(versions, reverse=True):
                if versions[number].state is state:
                    return versions[number].info(name, number)
            return None

    def list_versions(self, *, name: str | None) -> list[VersionInfo]:
        with self._lock:
            names = sorted(self._versions) if name is None else [name]
            for n in names:
                self._reap(n)
            return [self._versions[n][v].info(n, v) for n in names for v in sorted(self._versions.get(n, {}))]

    def get_sources(self, *, name: str, version: int, ranks: Sequence[int] = ()) -> list[SourceRecord]:
        with self._lock:
            self._reap(name)
            v = self._get(name, version)
            return [v.sources[r] for r in base.selected(v.sources, ranks)]

    def resolve(self, *, name: str, version: int | None, known_layout: str, ranks: Sequence[int] = ()) -> Resolved:
        with self._lock:
            self._reap(name)
            if version is None:
                versions = self._versions.get(name, {})
                ready = [n for n, v in versions.items() if v.state is VersionState.READY]
                if not ready:
                    raise base.no_ready(name)
                version = max(ready)
            v = self._get(name, version)
            omitted = bool(known_layout) and known_layout == v.layout
            records = v.heads if omitted else v.sources
            return Resolved(
                info=v.info(name, version),
                sources=tuple(records[r] for r in base.selected(records, ranks)),
                layout_digest=v.layout,
                tensors_omitted=omitted,
            )

    def retire(self, *, name: str, version: int, and_older: bool) -> list[int]:
        with self._lock:
            self._reap(name)
            versions = self._versions.get(name, {})
            if version not in versions and not and_older:
                if version <= self._pruned.get(name, -1):
                    return []  # retired and deleted already
                raise base.not_found(name, version)
            targets = sorted(n for n in versions if n <= version) if and_older else [version]
            final = (VersionState.RETIRED, VersionState.FAILED)
            changed = [n for n in targets if versions[n].state not in final]
            for n in changed:
                versions[n].state = VersionState.RETIRED
            if changed:
                self._changed(name)
            if self.keep_retired is not None:
                retired = sorted((n for n, v in versions.items() if v.state is VersionState.RETIRED), reverse=True)
                deleted = sorted(retired[self.keep_retired :])
                for n in deleted:
                    del versions[n]
                if deleted:
                    self._changed(name)
                    self._pruned[name] = max(self._pruned.get(name, -1), deleted[-1])
                    logger.info("%r: deleted retired versions %s (keep_retired=%d)", name, deleted, self.keep_retired)
            return changed

    def generation(self, *, name: str) -> str:
        with self._lock:
            self._reap(name)
            return f"{self._epoch}:{self._changes.get(name, 0)}"

    def counts(self) -> base.StoreCounts:
        with self._lock:
            states = Counter(v.state for versions in self._versions.values() for v in versions.values())
            return base.StoreCounts(versions=dict(states), claims=sum(len(c) for c in self._claims.values()))

    def _get(self, name: str, version: int) -> _Version:
        v = self._versions.get(name, {}).get(version)
        if v is None:
            pruned = version <= self._pruned.get(name, -1)
            raise base.deleted(name, version) if pruned else base.not_found(name, version)
        return v
