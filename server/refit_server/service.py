"""`CatalogService`: the gRPC servicer of the `refit.v1.Catalog` service.

Owns the authority check of every call (`refit_server.auth`, before any handler), request validation,
the call into the store, and the translation of refit errors into gRPC
status codes plus the `refit-error` trailing metadata (the error's class name), which lets
`CatalogClient` re-raise the exact class. State rules live in the stores, not here.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from refit import errors
from refit.catalog import bounds, wire
from refit.catalog.bounds import DEFAULT_LIMITS, CatalogLimits
from refit.catalog.values import Resolved
from refit.proto import catalog_pb2 as pb
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit.types import VersionState
from refit_server.auth import Authority
from refit_server.metrics import CatalogMetrics
from refit_server.replies import ReplyCache
from refit_server.stores import Store

logger = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of decides its status code.
_STATUS: tuple[tuple[type[errors.RefitError], grpc.StatusCode], ...] = (
    (errors.VersionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.RankTakenError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.VersionRetiredError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.VersionFailedError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.LeaseExpiredError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.VersionNotReadyError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.CatalogUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
)

_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def status_for(exc: errors.RefitError) -> grpc.StatusCode:
    if isinstance(exc, errors.AuthError):
        return grpc.StatusCode.PERMISSION_DENIED if exc.permission_denied else grpc.StatusCode.UNAUTHENTICATED
    return next((code for cls, code in _STATUS if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)


class Malformed:
    """A request body that is not a valid protobuf message of its RPC: answered INVALID_ARGUMENT.

    gRPC answers a request its deserializer cannot parse with INTERNAL, as if the catalog had failed;
    the lenient deserializer of `add_to_server` hands this over instead, and `_rpc` refuses it after
    the caller's token is checked, like any other bad argument.
    """

    def __init__(self, what: str, error: str) -> None:
        self.what, self.error = what, error


def _lenient(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Malformed(cls.__name__, str(exc))

    return parse


def _serialize(message: Message | bytes) -> bytes:
    """A reply's bytes; a handler may return them already encoded (the `Resolve` reply cache)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(service: CatalogService, server: grpc.Server) -> None:
    """Register `service` for every RPC of `refit.v1.Catalog`, with lenient request parsing."""
    descriptor = pb.DESCRIPTOR.services_by_name["Catalog"]
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            getattr(service, m.name),
            request_deserializer=_lenient(getattr(pb, m.input_type.name)),
            response_serializer=_serialize,
        )
        for m in descriptor.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)  # as the generated code does


def _rpc(method: _Handler) -> _Handler:
    """Check the caller's token, then run the handler; turn a RefitError into its status and metadata,
    anything else into INTERNAL. A refused caller never reaches the handler, so changes nothing.
    Every answered call, whatever its outcome, is counted in the metrics (when enabled)."""
    rpc = method.__name__

    @functools.wraps(method)
    def handler(self: CatalogService, request: Any, context: grpc.ServicerContext) -> Any:
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            try:
                self._authority.check(rpc, context.invocation_metadata())
            except errors.AuthError as exc:
                # Who was refused, not with what: the message names no token.
                logger.warning("refused %s from %s: %s", rpc, context.peer(), exc)
                raise
            if isinstance(request, Malformed):
                raise errors.ConfigError(f"request is not a valid {request.what}: {request.error}")
            return method(self, request, context)
        except errors.RefitError as exc:
            code = status_for(exc)
            logger.debug("%s -> %s: %s", rpc, code.name, exc)
            context.set_trailing_metadata(((wire.ERROR_METADATA_KEY, type(exc).__name__),))
            context.abort(code, str(exc))
        except Exception as exc:  # the server must answer, not drop the call; the log keeps the trace
            code = grpc.StatusCode.INTERNAL
            logger.exception("%s failed", rpc)
            context.set_trailing_metadata(((wire.ERROR_METADATA_KEY, "CatalogError"),))
            context.abort(code, f"catalog internal error: {type(exc).__name__}: {exc}")
        finally:
            if self._metrics is not None:
                self._metrics.observe(rpc, code.name, time.perf_counter() - start, context.peer())

    return handler  # type: ignore[return-value]


def _lease(lease_s: float) -> float:
    if not (math.isfinite(lease_s) and lease_s >= 0):
        raise errors.ConfigError(f"lease_s must be a finite number >= 0, got {lease_s}")
    return lease_s


class CatalogService(pb_grpc.CatalogServicer):
    """Checks each caller's authority, validates every field of each request against `limits`
    (`refit.catalog.bounds`: INVALID_ARGUMENT naming the field, the store untouched) and forwards it.
    With `replies`, `Resolve` answers come from that cache while the model's generation is unchanged
    (`refit_server.replies`); `Resolve` then returns the reply's bytes, not a message."""

    def __init__(
        self,
        store: Store,
        authority: Authority | None = None,
        limits: CatalogLimits = DEFAULT_LIMITS,
        metrics: CatalogMetrics | None = None,
        replies: ReplyCache | None = None,
    ) -> None:
        self._store = store
        self.replies = replies
        self._metrics = metrics
        self._authority = authority if authority is not None else Authority()
        self._limits = limits

    def _name(self, name: str) -> str:
        return bounds.name("model name", name, self._limits)

    def _version(self, version: int) -> int:
        return bounds.version("version", version, self._limits)

    def _rank(self, rank: int) -> int:
        return bounds.rank("rank", rank, self._limits)

    def _agent(self, agent_name: str) -> str:
        return bounds.agent_name("agent_name", agent_name, self._limits)

    def _ranks(self, ranks: Any) -> tuple[int, ...]:
        bounds.count("ranks", len(ranks), self._limits.max_world_size)
        return tuple(bounds.rank(f"ranks[{i}]", r, self._limits) for i, r in enumerate(ranks))

    @_rpc
    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:
        self._store.ping()
        return pb.PingResponse()

    @_rpc
    def Claim(self, request: pb.ClaimRequest, context: grpc.ServicerContext) -> pb.ClaimResponse:
        claim = self._store.claim(
            name=self._name(request.name),
            rank=self._rank(request.rank),
            agent_name=self._agent(request.agent_name),
            takeover=request.takeover,
            now=time.time(),
            lease_s=_lease(request.lease_s),
        )
        return pb.ClaimResponse(claim=wire.claim_to_proto(claim))

    @_rpc
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        claim = self._store.heartbeat(
            name=self._name(request.name),
            rank=self._rank(request.rank),
            agent_name=self._agent(request.agent_name),
        )
        return pb.HeartbeatResponse(claim=wire.claim_to_proto(claim))

    @_rpc
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        self._store.release(
            name=self._name(request.name),
            rank=self._rank(request.rank),
            agent_name=self._agent(request.agent_name),
        )
        return pb.ReleaseResponse()

    @_rpc
    def Publish(self, request: pb.PublishRequest, context: grpc.ServicerContext) -> pb.PublishResponse:
        name, version = self._name(request.name), self._version(request.version)
        world_size = bounds.world_size("world_size", request.world_size, self._limits)
        if not request.HasField("model") or not request.HasField("source"):
            raise errors.ConfigError("publish needs both a model and a source")
        model = wire.model_from_proto(request.model, self._limits)
        source = wire.source_from_proto(request.source, self._limits)
        if source.rank >= world_size:
            raise errors.ConfigError(f"source.rank {source.rank} is outside world_size {world_size}")
        now = time.time()
        info = self._store.publish(
            name=name, version=version, world_size=world_size, model=model, source=source, now=now
        )
        logger.debug(
            "%s v%d: rank %d published by %s (%d/%d)",
            name,
            version,
            source.rank,
            source.agent_name,
            len(info.published_ranks),
            world_size,
        )
        if info.ready_at == now:  # this part completed the version
            logger.info("%s v%d is READY (%d ranks)", name, version, world_size)
        return pb.PublishResponse(info=wire.version_to_proto(info))

    @_rpc
    def GetVersion(self, request: pb.GetVersionRequest, context: grpc.ServicerContext) -> pb.GetVersionResponse:
        info = self._store.get_version(name=self._name(request.name), version=self._version(request.version))
        return pb.GetVersionResponse(info=wire.version_to_proto(info))

    @_rpc
    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext) -> pb.GetStateResponse:
        state = self._store.get_state(name=self._name(request.name), version=self._version(request.version))
        return pb.GetStateResponse(state=wire.state_to_proto(state))

    @_rpc
    def Latest(self, request: pb.LatestRequest, context: grpc.ServicerContext) -> pb.LatestResponse:
        state = wire.state_from_proto(request.state)  # an unknown or unset state is INVALID_ARGUMENT
        info = self._store.latest(name=self._name(request.name), state=state)
        return pb.LatestResponse(info=wire.version_to_proto(info)) if info is not None else pb.LatestResponse()

    @_rpc
    def ListVersions(self, request: pb.ListVersionsRequest, context: grpc.ServicerContext) -> pb.ListVersionsResponse:
        name = self._name(request.name) if request.HasField("name") else None
        infos = self._store.list_versions(name=name)
        return pb.ListVersionsResponse(versions=[wire.version_to_proto(i) for i in infos])

    @_rpc
    def GetSources(self, request: pb.GetSourcesRequest, context: grpc.ServicerContext) -> pb.GetSourcesResponse:
        sources = self._store.get_sources(
            name=self._name(request.name), version=self._version(request.version), ranks=self._ranks(request.ranks)
        )
        return pb.GetSourcesResponse(sources=[wire.source_to_proto(s) for s in sources])

    @_rpc
    def Resolve(self, request: pb.ResolveRequest, context: grpc.ServicerContext) -> pb.ResolveResponse | bytes:
        name = self._name(request.name)
        version = self._version(request.version) if request.HasField("version") else None
        known = bounds.text("known_layout", request.known_layout, self._limits.max_short_chars, required=False)
        ranks = tuple(sorted(set(self._ranks(request.ranks))))

        def resolve() -> Resolved:
            return self._store.resolve(name=name, version=version, known_layout=known, ranks=ranks)

        if self.replies is None:
            return wire.resolved_to_proto(resolve())

        def encoded() -> tuple[bytes, bool]:
            resolved = resolve()
            # Only READY replies are covered by the generation (`Store.generation`).
            return wire.resolved_to_proto(resolved).SerializeToString(), resolved.info.state is VersionState.READY

        generation = self._store.generation(name=name)  # first: a reply is never older than its generation
        return self.replies.get((name, version, known, ranks), generation, encoded, wait_s=context.time_remaining())

    @_rpc
    def Retire(self, request: pb.RetireRequest, context: grpc.ServicerContext) -> pb.RetireResponse:
        name, version = self._name(request.name), self._version(request.version)
        changed = self._store.retire(name=name, version=version, and_older=request.and_older)
        if changed:
            logger.info("%s: retired versions %s", name, changed)
        return pb.RetireResponse(retired=changed)
