"""`CatalogService`: the gRPC servicer of the `refit.v1.Catalog` service.

Owns the authority check of every call (`refit_server.auth`, before any handler), request validation,
the call into the store, and the translation of refit errors into gRPC
status codes plus the `refit-error` trailing metadata (the error's class name), which lets
`CatalogClient` re-raise the exact class. State rules live in the stores, not here.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from refit import errors
from refit.catalog import wire
from refit.proto import catalog_pb2 as pb
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit_server.auth import Authority
from refit_server.stores import Store

logger = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of decides its status code.
_STATUS: tuple[tuple[type[errors.RefitError], grpc.StatusCode], ...] = (
    (errors.VersionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.RankTakenError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.VersionRetiredError, grpc.StatusCode.FAILED_PRECONDITION),
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


def _rpc(method: _Handler) -> _Handler:
    """Check the caller's token, then run the handler; turn a RefitError into its status and metadata,
    anything else into INTERNAL. A refused caller never reaches the handler, so changes nothing."""

    @functools.wraps(method)
    def handler(self: CatalogService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            try:
                self._authority.check(method.__name__, context.invocation_metadata())
            except errors.AuthError as exc:
                # Who was refused, not with what: the message names no token.
                logger.warning("refused %s from %s: %s", method.__name__, context.peer(), exc)
                raise
            return method(self, request, context)
        except errors.RefitError as exc:
            code = status_for(exc)
            logger.debug("%s -> %s: %s", method.__name__, code.name, exc)
            context.set_trailing_metadata(((wire.ERROR_METADATA_KEY, type(exc).__name__),))
            context.abort(code, str(exc))
        except Exception as exc:  # the server must answer, not drop the call; the log keeps the trace
            logger.exception("%s failed", method.__name__)
            context.set_trailing_metadata(((wire.ERROR_METADATA_KEY, "CatalogError"),))
            context.abort(grpc.StatusCode.INTERNAL, f"catalog internal error: {type(exc).__name__}: {exc}")

    return handler  # type: ignore[return-value]


def _name(name: str) -> str:
    if not name:
        raise errors.ConfigError("model name must be non-empty")
    return name


def _non_negative(what: str, value: int) -> int:
    if value < 0:
        raise errors.ConfigError(f"{what} must be >= 0, got {value}")
    return value


def _ranks(ranks: Any) -> tuple[int, ...]:
    bad = [r for r in ranks if r < 0]
    if bad:
        raise errors.ConfigError(f"ranks must be >= 0, got {bad}")
    return tuple(ranks)


def _agent(agent_name: str) -> str:
    if not agent_name:
        raise errors.ConfigError("agent_name must be non-empty")
    return agent_name


class CatalogService(pb_grpc.CatalogServicer):
    """Checks each caller's authority, validates each request and forwards it to the store."""

    def __init__(self, store: Store, authority: Authority | None = None) -> None:
        self._store = store
        self._authority = authority if authority is not None else Authority()

    @_rpc
    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:
        self._store.ping()
        return pb.PingResponse()

    @_rpc
    def Claim(self, request: pb.ClaimRequest, context: grpc.ServicerContext) -> pb.ClaimResponse:
        claim = self._store.claim(
            name=_name(request.name),
            rank=_non_negative("rank", request.rank),
            agent_name=_agent(request.agent_name),
            takeover=request.takeover,
            now=time.time(),
        )
        return pb.ClaimResponse(claim=wire.claim_to_proto(claim))

    @_rpc
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        self._store.release(
            name=_name(request.name),
            rank=_non_negative("rank", request.rank),
            agent_name=_agent(request.agent_name),
        )
        return pb.ReleaseResponse()

    @_rpc
    def Publish(self, request: pb.PublishRequest, context: grpc.ServicerContext) -> pb.PublishResponse:
        name, version, world_size = _name(request.name), _non_negative("version", request.version), request.world_size
        if world_size <= 0:
            raise errors.ConfigError(f"world_size must be positive, got {world_size}")
        if not request.HasField("model") or not request.HasField("source"):
            raise errors.ConfigError("publish needs both a model and a source")
        model = wire.model_from_proto(request.model)
        source = wire.source_from_proto(request.source)
        if source.rank >= world_size:
            raise errors.ConfigError(f"source rank {source.rank} is outside world_size {world_size}")
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
        info = self._store.get_version(name=_name(request.name), version=_non_negative("version", request.version))
        return pb.GetVersionResponse(info=wire.version_to_proto(info))

    @_rpc
    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext) -> pb.GetStateResponse:
        state = self._store.get_state(name=_name(request.name), version=_non_negative("version", request.version))
        return pb.GetStateResponse(state=wire.state_to_proto(state))

    @_rpc
    def Latest(self, request: pb.LatestRequest, context: grpc.ServicerContext) -> pb.LatestResponse:
        state = wire.state_from_proto(request.state)
        info = self._store.latest(name=_name(request.name), state=state)
        return pb.LatestResponse(info=wire.version_to_proto(info)) if info is not None else pb.LatestResponse()

    @_rpc
    def ListVersions(self, request: pb.ListVersionsRequest, context: grpc.ServicerContext) -> pb.ListVersionsResponse:
        name = _name(request.name) if request.HasField("name") else None
        infos = self._store.list_versions(name=name)
        return pb.ListVersionsResponse(versions=[wire.version_to_proto(i) for i in infos])

    @_rpc
    def GetSources(self, request: pb.GetSourcesRequest, context: grpc.ServicerContext) -> pb.GetSourcesResponse:
        sources = self._store.get_sources(
            name=_name(request.name), version=_non_negative("version", request.version), ranks=_ranks(request.ranks)
        )
        return pb.GetSourcesResponse(sources=[wire.source_to_proto(s) for s in sources])

    @_rpc
    def Resolve(self, request: pb.ResolveRequest, context: grpc.ServicerContext) -> pb.ResolveResponse:
        version = _non_negative("version", request.version) if request.HasField("version") else None
        resolved = self._store.resolve(
            name=_name(request.name), version=version, known_layout=request.known_layout, ranks=_ranks(request.ranks)
        )
        return wire.resolved_to_proto(resolved)

    @_rpc
    def Retire(self, request: pb.RetireRequest, context: grpc.ServicerContext) -> pb.RetireResponse:
        name, version = _name(request.name), _non_negative("version", request.version)
        changed = self._store.retire(name=name, version=version, and_older=request.and_older)
        if changed:
            logger.info("%s: retired versions %s", name, changed)
        return pb.RetireResponse(retired=changed)
