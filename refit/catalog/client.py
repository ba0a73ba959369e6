"""`CatalogClient`: the typed client of the refit catalog.

Owns the gRPC channel, the deadline on every call and the mapping of gRPC failures to refit errors;
nothing protobuf or `grpc.RpcError` leaves this module. The server names the refit error class in the
`refit-error` trailing metadata, so the exact class is re-raised; the status code is the fallback
(e.g. for a proxy in between, or a server that never answered).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from refit import errors
from refit.catalog import bounds, wire
from refit.catalog.bounds import DEFAULT_LIMITS, CatalogLimits
from refit.catalog.values import Resolved
from refit.errors import CatalogError, CatalogUnavailableError, ConfigError
from refit.proto import catalog_pb2 as pb
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit.types import Claim, ModelMeta, SourceRecord, VersionInfo, VersionState

logger = logging.getLogger(__name__)

__all__ = ["CatalogClient", "Resolved", "format_ranks"]

# Only these classes may be named by the server; anything else falls back to the status code.
_ERRORS_BY_NAME: dict[str, type[errors.RefitError]] = {
    cls.__name__: cls
    for cls in (
        errors.CatalogError,
        errors.CatalogUnavailableError,
        errors.VersionNotFoundError,
        errors.VersionNotReadyError,
        errors.VersionRetiredError,
        errors.RankTakenError,
        errors.ConflictError,
        errors.ConfigError,
        errors.AuthError,
    )
}

TOKEN_ENV = "REFIT_CATALOG_TOKEN"
_AUTH = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def resolve_token(token: str | None) -> str | None:
    """`token`, or `$REFIT_CATALOG_TOKEN` when it is None; None (no credential) when both are unset.

    Refused before any call: a token gRPC metadata cannot carry (non-ASCII, whitespace) would
    otherwise fail later with a transport error that hides the cause. The message never shows it.
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
        source = f"${TOKEN_ENV}"
    else:
        source = "token"
    if token is None:
        return None
    if not isinstance(token, str) or not token or not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(f"{source} must be a non-empty string of printable ASCII without spaces")
    return token


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path!r}: {exc.strerror}") from exc


_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def format_ranks(ranks: Sequence[int]) -> str:
    """`[0, 1, 2, 5, 7, 8]` -> `"0-2, 5, 7-8"`: short even for thousand-rank worlds."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


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
        if (tls_cert is None) != (tls_key is None) or (tls_cert is not None and tls_ca is None):
            raise ConfigError("tls_cert and tls_key go together, and need tls_ca")
        token = resolve_token(token)
        self.address = address
        self.timeout_s = timeout_s
        self.limits = limits
        self.tls = tls_ca is not None
        # The token lives only in the metadata tuple, never in an attribute a repr or log would show.
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.max_receive_message_length", limits.max_message_bytes),
        ]
        if dedicated_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        if self.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca, "tls_ca"),
                private_key=_read(tls_key, "tls_key"),
                certificate_chain=_read(tls_cert, "tls_cert"),
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.CatalogStub(self._channel)
        self._closed = False

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
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._translate(method, exc) from None

    def _translate(self, method: str, exc: grpc.RpcError) -> errors.RefitError:
        code: grpc.StatusCode = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
        metadata = (exc.trailing_metadata() if isinstance(exc, grpc.Call) else None) or ()
        named = next((v for k, v in metadata if k == wire.ERROR_METADATA_KEY), None)
        cls = _ERRORS_BY_NAME.get(named) if isinstance(named, str) else None
        logger.debug("catalog %s %s -> %s (%s): %s", self.address, method, code.name, named, details)
        if cls is CatalogUnavailableError or (cls is None and code in _UNAVAILABLE):
            return CatalogUnavailableError(
                f"catalog at {self.address} is unavailable ({method}: {code.name}, "
                f"deadline {self.timeout_s:g}s): {details}"
            )
        if cls is errors.AuthError or (cls is None and code in _AUTH):
            return errors.AuthError(
                f"catalog at {self.address} refused {method} ({code.name}): {details}",
                permission_denied=code == grpc.StatusCode.PERMISSION_DENIED,
            )
        if cls is not None:
            return cls(details)
        if code == grpc.StatusCode.NOT_FOUND:
            return errors.VersionNotFoundError(details)
        if code == grpc.StatusCode.ALREADY_EXISTS:
            return errors.RankTakenError(details)
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            retired = "retired" in details.lower()
            return errors.VersionRetiredError(details) if retired else errors.ConflictError(details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ConfigError(details)
        return CatalogError(f"catalog at {self.address}: {method} failed with {code.name}: {details}")

    # -- RPCs --------------------------------------------------------------------------------------

    def ping(self) -> None:
        """Return once the catalog (and its store) answers; CatalogUnavailableError otherwise."""
        self._call("Ping", pb.PingRequest)

    def claim(self, *, name: str, rank: int, agent_name: str, takeover: bool = False) -> Claim:
        """Hold `rank` of model `name` for `agent_name`.

        Idempotent for the holder. RankTakenError (naming the rank and the holder) if another agent
        holds it, unless `takeover` (e.g. a restarted trainer whose agent has a new name).
        """
        response = self._call("Claim", pb.ClaimRequest, name=name, rank=rank, agent_name=agent_name, takeover=takeover)
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

        The round trip runs in gRPC's own threads while the caller goes on (the receiver installs
        its last chunk meanwhile); the returned call raises what `version_state` would.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"version_state: model name must be a non-empty str, got {name!r}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ConfigError(f"version_state: version must be an int >= 0, got {version!r}")
        if self._closed:
            raise CatalogError(f"catalog client for {self.address} is closed")
        future = self._stub.GetState.future(
            pb.GetStateRequest(name=name, version=version), timeout=self.timeout_s, metadata=self._metadata
        )

        def answer() -> VersionState:
            try:
                return wire.state_from_proto(future.result().state)
            except grpc.RpcError as exc:
                raise self._translate("GetState", exc) from None

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

    def get_sources(self, *, name: str, version: int) -> list[SourceRecord]:
        """The published parts of a version, sorted by rank; VersionNotFoundError if unknown."""
        response = self._call("GetSources", pb.GetSourcesRequest, name=name, version=version)
        return list(wire.sources_from_proto(response.sources, None, self.limits))

    def resolve(self, *, name: str, version: int | None = None, known_layout: str = "") -> Resolved:
        """`version` (None: the newest READY one) with its state and sources, in one round trip.

        Any state is returned for an explicit `version`; the caller checks `info.state`. When
        `known_layout` is the version's `layout_digest` (a plan cached from an earlier resolve), the
        sources come without tensor descriptors and `tensors_omitted` is True: a small message.

        Raises:
            VersionNotFoundError: `version` is unknown, or it is None and no version is READY (no
                waiting: poll, or use `wait_ready` for a given version).
        """
        fields: dict[str, Any] = {"name": name, "known_layout": known_layout}
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
