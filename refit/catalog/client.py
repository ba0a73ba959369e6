"""`CatalogClient`: the typed client of the refit catalog.

Owns the gRPC channel, the deadline on every call and the mapping of gRPC failures to refit errors;
nothing protobuf or `grpc.RpcError` leaves this module. The server names the refit error class in the
`refit-error` trailing metadata, so the exact class is re-raised; the status code is the fallback
(e.g. for a proxy in between, or a server that never answered).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from refit import errors
from refit.catalog import bounds, wire
from refit.catalog.bounds import DEFAULT_LIMITS, CatalogLimits
from refit.catalog.channel import (
    FIRST_CONTACT_S,
    RETRY_FIRST_S,
    RETRY_MAX_S,
    TOKEN_ENV,
    answered,
    check_tls,
    open_channel,
    resolve_token,
    translate,
)
from refit.catalog.values import Resolved
from refit.errors import CatalogError, CatalogUnavailableError, ConfigError
from refit.proto import catalog_pb2 as pb
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit.types import Claim, ModelMeta, SourceRecord, VersionInfo, VersionState

_R = TypeVar("_R")

logger = logging.getLogger(__name__)

__all__ = ["TOKEN_ENV", "CatalogClient", "Resolved", "format_ranks", "resolve_token"]


def format_ranks(ranks: Sequence[int]) -> str:
    """`[0, 1, 2, 5, 7, 8]` -> `"0-2, 5, 7-8"`: short even for thousand-rank worlds."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _rank_list(method: str, ranks: Sequence[int]) -> list[int]:
    """Sorted distinct ranks, refused before a round trip unless every one is an int >= 0."""
    if isinstance(ranks, (str, bytes)) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks
    ):
        raise ConfigError(f"{method}: ranks must be ints >= 0, got {ranks!r}")
    return sorted(set(ranks))


class CatalogClient:
    """Talks to a refit catalog at `address` ("host:port"); every call has a `timeout_s` deadline.

    Closable (`close()` or a `with` block) and safe to share between threads.

    Args:
        address: the catalog's "host:port".
        timeout_s: deadline of every call.
        token: the catalog credential (trainer or reader token), sent as `authorization: Bearer`
            metadata on every call; None: `$REFIT_CATALOG_TOKEN`, else no credential. Never logged.
        tls_ca: PEM file of the CA that signed the catalog's certificate: the channel uses TLS.
        tls_cert, tls_key: PEM files of this client's certificate and key, for a catalog that
            requires mutual TLS (need `tls_ca`).
        limits: bounds every record and version the catalog returns must keep (`CatalogLimits`;
            the defaults are the server's): a record whose byte ranges leave its regions, or whose
            sizes are out of bounds, is refused (ConfigError naming the field) before anyone plans
            a read from it.
        dedicated_connection: open this client's own TCP connection, where by default clients of one
            process with the same address share one: for a process that stands in for many readers
            (a load test) or wants its calls kept apart from others'.

    Reconnection: once a client has reached the catalog, a call that finds it gone (a restarted
    catalog server, or one whose Redis is restarting) waits and retries until its `timeout_s`
    deadline, so a restart shorter than the deadline is invisible to callers. Every RPC is
    idempotent (a re-sent publish replaces the agent's own part, a re-sent claim is the holder's),
    so a retry after a lost reply is safe. A client that never reached the catalog fails at once:
    a wrong address is reported, not waited on.

    Raises (from every method): CatalogUnavailableError when the catalog cannot be reached or does not
    answer in time; ConfigError for arguments the catalog refuses; other CatalogError subclasses as
    documented per method.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 10.0,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        limits: CatalogLimits = DEFAULT_LIMITS,
        dedicated_connection: bool = False,
    ) -> None:
        if not address:
            raise ConfigError("catalog address must be non-empty ('host:port')")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {timeout_s}")
        if not isinstance(limits, CatalogLimits):
            raise ConfigError(f"limits must be a CatalogLimits, got {type(limits).__name__}")
        check_tls(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        token = resolve_token(token)
        self.address = address
        self.timeout_s = timeout_s
        self.limits = limits
        self.tls = tls_ca is not None
        # The token lives only in the metadata tuple, never in an attribute a repr or log would show.
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = open_channel(
            address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, limits=limits,
            dedicated=dedicated_connection,
        )  # fmt: skip
        self._stub = pb_grpc.CatalogStub(self._channel)
        self._closed = False
        self._reached = False  # set by the first answer from the catalog: from then on, retry outages

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> CatalogClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        auth = ", token=***" if self._metadata else ""
        tls = ", tls" if self.tls else ""
        return f"CatalogClient({self.address!r}{auth}{tls}{', closed' if self._closed else ''})"

    # -- transport ---------------------------------------------------------------------------------

    def _call(self, method: str, request_type: type[Message], **fields: Any) -> Any:
        if self._closed:
            raise CatalogError(f"catalog client for {self.address} is closed")
        try:
            request = request_type(**fields)
        except (TypeError, ValueError) as exc:  # wrong type or out of the field's range
            raise ConfigError(f"{method}: {exc}") from exc
        return self._send(method, request, time.monotonic() + self.timeout_s)

    def _send(self, method: str, request: Message, deadline: float) -> Any:
        """One RPC, retried while the catalog is unavailable (once it has been reached) until `deadline`."""
        backoff = RETRY_FIRST_S
        # A client that never reached its catalog retries only briefly: a connection still being set
        # up on a loaded host is waited for, a wrong address is still reported within a second.
        first_until = time.monotonic() + FIRST_CONTACT_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                reply = getattr(self._stub, method)(
                    request, timeout=max(remaining, 0.001), metadata=self._metadata, wait_for_ready=self._reached
                )
            except grpc.RpcError as exc:
                error = self._translate(method, exc)
                if not isinstance(error, CatalogUnavailableError):
                    raise error from None
                if not self._reached and time.monotonic() + backoff > first_until:
                    raise error from None
                remaining = deadline - time.monotonic()
                if remaining <= backoff:
                    raise error from None
                logger.info("catalog at %s unavailable (%s); retrying for %.1fs more", self.address, method, remaining)
                time.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            self._reached = True
            return reply

    def _translate(self, method: str, exc: grpc.RpcError) -> errors.RefitError:
        if answered(exc):
            self._reached = True
        return translate(self.address, self.timeout_s, method, exc)

    # -- RPCs --------------------------------------------------------------------------------------

    def ping(self) -> None:
        """Return once the catalog (and its store) answers; CatalogUnavailableError otherwise."""
        self._call("Ping", pb.PingRequest)

    def claim(self, *, name: str, rank: int, agent_name: str, takeover: bool = False, lease_s: float = 0.0) -> Claim:
        """Hold `rank` of model `name` for `agent_name`.

        Idempotent for the holder (renewing its lease). RankTakenError (naming the rank and the
        holder) if another agent holds it, unless `takeover` (e.g. a restarted trainer whose agent
        has a new name). `lease_s` > 0 makes the claim a lease that `heartbeat` must renew: when it
        lapses the rank is dead (see docs/catalog.md, "Leases"); 0 claims without a lease.
        """
        if not isinstance(lease_s, int | float) or isinstance(lease_s, bool) or not lease_s >= 0:
            raise ConfigError(f"claim: lease_s must be a number >= 0, got {lease_s!r}")
        response = self._call(
            "Claim",
            pb.ClaimRequest,
            name=name,
            rank=rank,
            agent_name=agent_name,
            takeover=takeover,
            lease_s=float(lease_s),
        )
        return wire.claim_from_proto(response.claim)

    def heartbeat(self, *, name: str, rank: int, agent_name: str) -> Claim:
        """Renew `agent_name`'s lease on `rank` for another `lease_s`; returns the renewed claim.

        Raises:
            LeaseExpiredError: the agent no longer holds the rank (its lease lapsed, it was taken over
                or released): claim it again and publish a new version.
        """
        response = self._call("Heartbeat", pb.HeartbeatRequest, name=name, rank=rank, agent_name=agent_name)
        return wire.claim_from_proto(response.claim)

    def release(self, *, name: str, rank: int, agent_name: str) -> None:
        """Drop `agent_name`'s claim on `rank`; a no-op if it does not hold it."""
        self._call("Release", pb.ReleaseRequest, name=name, rank=rank, agent_name=agent_name)

    def publish(
        self, *, name: str, version: int, world_size: int, model: ModelMeta, source: SourceRecord
    ) -> VersionInfo:
        """Publish one trainer rank's part of `version`; returns the version after this part.

        The first part creates the version (STAGING) with `world_size` and `model`; later parts must
        carry identical ones (ConflictError names the difference). The version becomes READY when
        ranks 0..world_size-1 have all published. Re-publishing by the same agent replaces its part.

        Raises:
            ConfigError: `source.rank >= world_size` or invalid values.
            RankTakenError: the rank is claimed by, or its part was published by, another agent.
            VersionRetiredError: the version is RETIRED.
            ConflictError: world size or model differ from the version's.
        """
        if not isinstance(model, ModelMeta) or not isinstance(source, SourceRecord):
            raise ConfigError("publish needs a ModelMeta and a SourceRecord")
        # The server's checks, before the round trip: a record out of bounds fails here, naming the field.
        bounds.check_source(source, self.limits)
        response = self._call(
            "Publish",
            pb.PublishRequest,
            name=name,
            version=version,
            world_size=world_size,
            model=wire.model_to_proto(model),
            source=wire.source_to_proto(source),
        )
        return wire.version_from_proto(response.info, self.limits)

    def get_version(self, *, name: str, version: int) -> VersionInfo:
        """The version as the catalog holds it; VersionNotFoundError if unknown."""
        response = self._call("GetVersion", pb.GetVersionRequest, name=name, version=version)
        return wire.version_from_proto(response.info, self.limits)

    def version_state(self, *, name: str, version: int) -> VersionState:
        """The version's state alone: the receiver's READY re-check after every pull.

        The smallest round trip the catalog has: no model, no ranks, one read in either store.

        Raises:
            ConfigError: `name` is not a non-empty str or `version` not an int >= 0 (before any RPC).
            VersionNotFoundError: the version is unknown.
        """
        # Checked here, not only by the server: a bad argument must not cost a round trip.
        if not isinstance(name, str) or not name:
            raise ConfigError(f"version_state: model name must be a non-empty str, got {name!r}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ConfigError(f"version_state: version must be an int >= 0, got {version!r}")
        response = self._call("GetState", pb.GetStateRequest, name=name, version=version)
        return wire.state_from_proto(response.state)

    def version_state_later(self, *, name: str, version: int) -> Callable[[], VersionState]:
        """`version_state`, sent now and answered later: returns a call that waits for the answer.

        The round trip runs in gRPC's own threads while the caller goes on; the returned call raises
        what `version_state` would.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"version_state: model name must be a non-empty str, got {name!r}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ConfigError(f"version_state: version must be an int >= 0, got {version!r}")
        return self._later("GetState", pb.GetStateRequest, lambda r: wire.state_from_proto(r.state),
                           name=name, version=version)  # fmt: skip

    def _later(self, method: str, request_type: type[Message], convert: Callable[[Any], _R], **fields: Any
               ) -> Callable[[], _R]:  # fmt: skip
        """`method` sent now; returns a call that waits for its answer (retried, within this client's
        timeout, if the catalog went away meanwhile) and converts it."""
        if self._closed:
            raise CatalogError(f"catalog client for {self.address} is closed")
        try:
            request = request_type(**fields)
        except (TypeError, ValueError) as exc:  # out of the field's range: refused before anything is sent
            raise ConfigError(f"{method}: {exc}") from exc
        deadline = time.monotonic() + self.timeout_s
        future = getattr(self._stub, method).future(
            request, timeout=self.timeout_s, metadata=self._metadata, wait_for_ready=self._reached
        )

        def answer() -> _R:
            try:
                reply = future.result()
            except grpc.RpcError as exc:
                error = self._translate(method, exc)
                if not isinstance(error, CatalogUnavailableError) or not self._reached:
                    raise error from None
                reply = self._send(method, request, deadline)  # the catalog went away: retry, same deadline
            self._reached = True
            return convert(reply)

        return answer

    def latest(self, *, name: str, state: VersionState = VersionState.READY) -> VersionInfo | None:
        """The highest-numbered version of `name` in `state`, or None."""
        response = self._call("Latest", pb.LatestRequest, name=name, state=wire.state_to_proto(state))
        return wire.version_from_proto(response.info, self.limits) if response.HasField("info") else None

    def list_versions(self, *, name: str | None = None) -> list[VersionInfo]:
        """Every version of `name` (of every model when None), sorted by (name, version)."""
        fields = {} if name is None else {"name": name}
        return [
            wire.version_from_proto(v, self.limits)
            for v in self._call("ListVersions", pb.ListVersionsRequest, **fields).versions
        ]

    def get_sources(self, *, name: str, version: int, ranks: Sequence[int] = ()) -> list[SourceRecord]:
        """The published parts of a version, sorted by rank; VersionNotFoundError if unknown.

        `ranks`: only these trainer ranks' parts (those the version lacks are left out); empty: all.
        """
        response = self._call(
            "GetSources", pb.GetSourcesRequest, name=name, version=version, ranks=_rank_list("get_sources", ranks)
        )
        return list(wire.sources_from_proto(response.sources, None, self.limits))

    def resolve(
        self, *, name: str, version: int | None = None, known_layout: str = "", ranks: Sequence[int] = ()
    ) -> Resolved:
        """`version` (None: the newest READY one) with its state and sources, in one round trip.

        Any state is returned for an explicit `version`; the caller checks `info.state`. When
        `known_layout` is the version's `layout_digest` (a plan cached from an earlier resolve), the
        sources come without tensor descriptors and `tensors_omitted` is True: a small message.
        `ranks` (empty: all) limits `sources` to those trainer ranks, the ones a cached plan reads;
        `info.published_ranks` still lists every rank.

        Raises:
            VersionNotFoundError: `version` is unknown, or it is None and no version is READY (no
                waiting: poll, or use `wait_ready` for a given version).
        """
        fields: dict[str, Any] = {"name": name, "known_layout": known_layout, "ranks": _rank_list("resolve", ranks)}
        if version is not None:
            fields["version"] = version
        return wire.resolved_from_proto(self._call("Resolve", pb.ResolveRequest, **fields), self.limits)

    def retire(self, *, name: str, version: int, and_older: bool = False) -> list[int]:
        """Mark `version` (and with `and_older` every older version) RETIRED; returns what changed.

        Idempotent. VersionNotFoundError if the version is unknown and `and_older` is False.
        """
        response = self._call("Retire", pb.RetireRequest, name=name, version=version, and_older=and_older)
        return list(response.retired)

    def wait_ready(self, *, name: str, version: int, timeout_s: float, poll_s: float = 0.05) -> VersionInfo:
        """Poll until `version` is READY and return it.

        Raises:
            VersionRetiredError: the version is (or becomes) RETIRED.
            VersionFailedError: the version is (or becomes) FAILED (a trainer rank died).
            VersionNotReadyError: still not READY after `timeout_s`; names the missing ranks.
            VersionNotFoundError: the version never appeared within `timeout_s`.
        """
        if timeout_s < 0 or poll_s <= 0:
            raise ConfigError(f"need timeout_s >= 0 and poll_s > 0, got {timeout_s} and {poll_s}")
        deadline = time.monotonic() + timeout_s
        info: VersionInfo | None = None
        while True:
            try:
                info = self.get_version(name=name, version=version)
            except errors.VersionNotFoundError:
                info = None
            if info is not None and info.state is VersionState.READY:
                return info
            if info is not None and info.state is VersionState.RETIRED:
                raise errors.VersionRetiredError(f"{name!r} v{version} is RETIRED; it will never be READY")
            if info is not None and info.state is VersionState.FAILED:
                raise errors.VersionFailedError(f"{name!r} v{version} FAILED ({info.failure}); it will never be READY")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(poll_s, remaining))
        if info is None:
            raise errors.VersionNotFoundError(
                f"{name!r} v{version} did not appear in the catalog at {self.address} within {timeout_s:g}s"
            )
        missing = info.missing_ranks
        raise errors.VersionNotReadyError(
            f"{name!r} v{version} is not READY after {timeout_s:g}s: "
            f"{len(info.published_ranks)}/{info.world_size} ranks published, missing ranks {format_ranks(missing)}",
            version=version,
            missing_ranks=missing,
        )
