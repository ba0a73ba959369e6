"""Conversion between the catalog's protobuf messages and `refit.types` values, both directions.

This module is the only place that knows both representations; the client and the server (and the
Redis store, which keeps serialized protobuf) go through it. Validation is the dataclasses' own
`__post_init__`: any proto that does not make a valid value raises `ConfigError`, and so does an
unspecified (0) enum, which is what a sender that forgot to set a field produces. Conversions from
the wire also apply `CatalogLimits` (`refit.catalog.bounds`): sizes and counts are checked on the
message before any value is built from it, and the error names the field.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from refit.catalog import bounds
from refit.catalog.bounds import DEFAULT_LIMITS, CatalogLimits
from refit.catalog.values import Resolved
from refit.errors import ConfigError
from refit.proto import catalog_pb2 as pb
from refit.types import (
    IPC_HANDLE_BYTES,
    Claim,
    DigestSet,
    ModelMeta,
    ParallelCoords,
    Region,
    Role,
    SourceRecord,
    TensorDesc,
    VersionInfo,
    VersionState,
)

# The server names the refit error class of a failed call in this trailing-metadata key.
ERROR_METADATA_KEY = "refit-error"
# Both ends allow messages this large: a big model's source record carries thousands of descriptors.
MAX_MESSAGE_BYTES = DEFAULT_LIMITS.max_message_bytes

# Enum values are named after the Python members with the proto enum's prefix; building the maps from
# the names makes an enum member missing from the .proto fail at import, not at the first publish.
_ROLE_TO_PB: dict[Role, int] = {r: pb.Role.Value(f"ROLE_{r.name}") for r in Role}
_ROLE_FROM_PB: dict[int, Role] = {v: r for r, v in _ROLE_TO_PB.items()}
_STATE_TO_PB: dict[VersionState, int] = {s: pb.VersionState.Value(f"VERSION_STATE_{s.name}") for s in VersionState}
_STATE_FROM_PB: dict[int, VersionState] = {v: s for s, v in _STATE_TO_PB.items()}

_COORD_KINDS = ("tp", "pp", "ep", "dp", "etp", "edp")
_COORD_FIELDS = tuple(f"{kind}_{what}" for kind in _COORD_KINDS for what in ("rank", "size"))
_MODEL_FIELDS = tuple(ModelMeta.__dataclass_fields__)
_V = TypeVar("_V")


def _build(cls: type[Message], **fields: object) -> Message:
    """Construct a proto message; out-of-range or mistyped values become ConfigError."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot encode {cls.__name__}: {exc}") from exc


def _value(field: str, cls: type[_V], **values: object) -> _V:
    """`cls(**values)`; its own validation error is re-raised naming the field it came from."""
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{field}: {exc}") from None


# --- enums ----------------------------------------------------------------------------------------


def role_to_proto(role: Role) -> int:
    return _ROLE_TO_PB[Role(role)]


def _role_name(value: int) -> str:
    return pb.Role.Name(value) if value in pb.Role.values() else str(value)


def role_from_proto(value: int) -> Role:
    role = _ROLE_FROM_PB.get(value)
    if role is None:
        raise ConfigError(f"tensor role {_role_name(value)} is not valid")
    return role


def state_to_proto(state: VersionState) -> int:
    return _STATE_TO_PB[VersionState(state)]


def state_from_proto(value: int) -> VersionState:
    state = _STATE_FROM_PB.get(value)
    if state is None:
        name = pb.VersionState.Name(value) if value in pb.VersionState.values() else value
        raise ConfigError(f"version state {name} is not valid")
    return state


# --- values ---------------------------------------------------------------------------------------


def coords_to_proto(coords: ParallelCoords) -> pb.ParallelCoords:
    return _build(pb.ParallelCoords, **{f: getattr(coords, f) for f in _COORD_FIELDS})


def coords_from_proto(
    msg: pb.ParallelCoords, limits: CatalogLimits | None = DEFAULT_LIMITS, field: str = "coords"
) -> ParallelCoords:
    values = {f: getattr(msg, f) for f in _COORD_FIELDS}
    for kind in ("etp", "edp"):  # absent in records written before expert coordinates existed
        values[f"{kind}_size"] = values[f"{kind}_size"] or 1
    coords = _value(field, ParallelCoords, **values)
    return coords if limits is None else bounds.check_coords(coords, limits, field)


def model_to_proto(model: ModelMeta) -> pb.ModelMeta:
    return _build(pb.ModelMeta, **{f: getattr(model, f) for f in _MODEL_FIELDS})


def model_from_proto(
    msg: pb.ModelMeta, limits: CatalogLimits | None = DEFAULT_LIMITS, field: str = "model"
) -> ModelMeta:
    if limits is not None:
        bounds.text(f"{field}.architecture", msg.architecture, limits.max_short_chars)
        bounds.text(f"{field}.params_dtype", msg.params_dtype, limits.max_short_chars)
    model = _value(field, ModelMeta, **{f: getattr(msg, f) for f in _MODEL_FIELDS})
    return model if limits is None else bounds.check_model(model, limits, field)


def tensor_to_proto(t: TensorDesc) -> pb.TensorDesc:
    return _build(
        pb.TensorDesc,
        name=t.name,
        role=role_to_proto(t.role),
        dtype=t.dtype,
        local_shape=list(t.local_shape),
        global_shape=list(t.global_shape),
        partition_dim=t.partition_dim,
        partition_stride=t.partition_stride,
        offset=t.offset,
        region=t.region,
        byte_offset=t.byte_offset,
        digest_block=t.digest_block,
    )


def tensor_from_proto(
    msg: pb.TensorDesc, limits: CatalogLimits | None = DEFAULT_LIMITS, field: str = "tensor"
) -> TensorDesc:
    if limits is not None:
        bounds.text(f"{field}.name", msg.name, limits.max_name_chars)
        bounds.text(f"{field}.dtype", msg.dtype, limits.max_short_chars)
        # Before the value is built: its own checks multiply the dims.
        bounds.check_dims(f"{field}.local_shape", msg.local_shape, limits)
        bounds.check_dims(f"{field}.global_shape", msg.global_shape, limits)
    if msg.role not in _ROLE_FROM_PB:
        raise ConfigError(f"{field}.role: {_role_name(msg.role)} is not valid")
    tensor = _value(
        field,
        TensorDesc,
        name=msg.name,
        role=role_from_proto(msg.role),
        dtype=msg.dtype,
        local_shape=tuple(msg.local_shape),
        global_shape=tuple(msg.global_shape),
        partition_dim=msg.partition_dim,
        partition_stride=msg.partition_stride,
        offset=msg.offset,
        region=msg.region,
        byte_offset=msg.byte_offset,
        digest_block=msg.digest_block,
    )
    if limits is not None:
        bounds.check_tensor(tensor, limits, field, dims=False)
    return tensor


def region_to_proto(r: Region) -> pb.Region:
    return _build(
        pb.Region, index=r.index, addr=r.addr, nbytes=r.nbytes, device=r.device, device_id=r.device_id,
        ipc_handle=bytes(r.ipc_handle), ipc_offset=r.ipc_offset,
    )  # fmt: skip


def region_from_proto(msg: pb.Region, limits: CatalogLimits | None = DEFAULT_LIMITS, field: str = "region") -> Region:
    if limits is not None:
        bounds.text(f"{field}.device", msg.device, limits.max_short_chars)
        bounds.blob(f"{field}.ipc_handle", msg.ipc_handle, IPC_HANDLE_BYTES)
    return _value(
        field, Region, index=msg.index, addr=msg.addr, nbytes=msg.nbytes, device=msg.device, device_id=msg.device_id,
        ipc_handle=bytes(msg.ipc_handle), ipc_offset=msg.ipc_offset,
    )  # fmt: skip


def source_to_proto(s: SourceRecord) -> pb.SourceRecord:
    return _build(
        pb.SourceRecord,
        rank=s.rank,
        coords=coords_to_proto(s.coords),
        agent_name=s.agent_name,
        agent_metadata=bytes(s.agent_metadata),
        regions=[region_to_proto(r) for r in s.regions],
        tensors=[tensor_to_proto(t) for t in s.tensors],
        digests=_build(pb.DigestSet, algorithm=s.digests.algorithm, values=bytes(s.digests.values)),
        fence_addr=s.fence_addr,
        host=s.host,
        fence_shm=s.fence_shm,
    )


def source_from_proto(
    msg: pb.SourceRecord, limits: CatalogLimits | None = DEFAULT_LIMITS, field: str = "source"
) -> SourceRecord:
    """A record from the wire; with `limits`, every bound is checked before the record is built."""
    if not msg.HasField("coords"):
        raise ConfigError(f"{field}.coords: missing (rank {msg.rank})")
    if limits is not None:
        bounds.rank(f"{field}.rank", msg.rank, limits)
        bounds.agent_name(f"{field}.agent_name", msg.agent_name, limits)
        bounds.blob(f"{field}.agent_metadata", msg.agent_metadata, limits.max_agent_metadata_bytes)
        bounds.count(f"{field}.regions", len(msg.regions), limits.max_regions_per_record)
        bounds.count(f"{field}.tensors", len(msg.tensors), limits.max_tensors_per_record)
        bounds.text(f"{field}.digests.algorithm", msg.digests.algorithm, limits.max_short_chars, required=False)
        bounds.text(f"{field}.host", msg.host, limits.max_short_chars, required=False)
        bounds.text(f"{field}.fence_shm", msg.fence_shm, limits.max_short_chars, required=False)
    regions = tuple(region_from_proto(r, limits, f"{field}.regions[{i}]") for i, r in enumerate(msg.regions))
    tensors = tuple(tensor_from_proto(t, limits, f"{field}.tensors[{i}]") for i, t in enumerate(msg.tensors))
    if limits is not None:
        bounds.check_parts(regions, tensors, limits, field)
    return _value(
        field,
        SourceRecord,
        rank=msg.rank,
        coords=coords_from_proto(msg.coords, limits, f"{field}.coords"),
        agent_name=msg.agent_name,
        agent_metadata=bytes(msg.agent_metadata),
        regions=regions,
        tensors=tensors,
        digests=DigestSet(algorithm=msg.digests.algorithm, values=bytes(msg.digests.values)),
        fence_addr=msg.fence_addr,
        host=msg.host,
        fence_shm=msg.fence_shm,
    )


def version_to_proto(v: VersionInfo) -> pb.VersionInfo:
    return _build(
        pb.VersionInfo,
        name=v.name,
        version=v.version,
        state=state_to_proto(v.state),
        world_size=v.world_size,
        published_ranks=list(v.published_ranks),
        model=model_to_proto(v.model),
        created_at=v.created_at,
        ready_at=v.ready_at,
        dead_ranks=list(v.dead_ranks),
        failure=v.failure,
    )


def version_from_proto(
    msg: pb.VersionInfo, limits: CatalogLimits | None = DEFAULT_LIMITS, field: str = "info"
) -> VersionInfo:
    if not msg.HasField("model"):
        raise ConfigError(f"{field}.model: missing ({bounds.shown(msg.name)} v{msg.version})")
    if limits is not None:
        bounds.name(f"{field}.name", msg.name, limits)
        bounds.version(f"{field}.version", msg.version, limits)
        bounds.world_size(f"{field}.world_size", msg.world_size, limits)
        bounds.count(f"{field}.published_ranks", len(msg.published_ranks), msg.world_size)
        for i, r in enumerate(msg.published_ranks):
            bounds.integer(f"{field}.published_ranks[{i}]", r, 0, msg.world_size - 1)
    return VersionInfo(
        name=msg.name,
        version=msg.version,
        state=state_from_proto(msg.state),
        world_size=msg.world_size,
        published_ranks=tuple(msg.published_ranks),
        model=model_from_proto(msg.model, limits, f"{field}.model"),
        created_at=msg.created_at,
        ready_at=msg.ready_at,
        dead_ranks=tuple(msg.dead_ranks),
        failure=msg.failure,
    )


def claim_to_proto(c: Claim) -> pb.Claim:
    return _build(
        pb.Claim,
        name=c.name,
        rank=c.rank,
        agent_name=c.agent_name,
        claimed_at=c.claimed_at,
        lease_s=c.lease_s,
        lease_expires_at=c.lease_expires_at,
    )


def claim_from_proto(msg: pb.Claim) -> Claim:
    return Claim(
        name=msg.name,
        rank=msg.rank,
        agent_name=msg.agent_name,
        claimed_at=msg.claimed_at,
        lease_s=msg.lease_s,
        lease_expires_at=msg.lease_expires_at,
    )


def resolved_to_proto(r: Resolved) -> pb.ResolveResponse:
    return _build(
        pb.ResolveResponse,
        info=version_to_proto(r.info),
        sources=[source_to_proto(s) for s in r.sources],
        layout_digest=r.layout_digest,
        tensors_omitted=r.tensors_omitted,
    )


def sources_from_proto(
    msgs: Sequence[pb.SourceRecord], world_size: int | None, limits: CatalogLimits | None = DEFAULT_LIMITS
) -> tuple[SourceRecord, ...]:
    """Records from the wire, sorted by rank: at most one per rank (and, given the world size, below it)."""
    if limits is not None:
        bounds.count("sources", len(msgs), world_size if world_size is not None else limits.max_world_size)
    sources = sorted((source_from_proto(s, limits, f"sources[{i}]") for i, s in enumerate(msgs)), key=lambda s: s.rank)
    for prev, cur in itertools.pairwise(sources):
        if prev.rank == cur.rank:
            raise ConfigError(f"sources: rank {cur.rank} appears twice")
    if world_size is not None and sources and sources[-1].rank >= world_size:
        raise ConfigError(f"sources: rank {sources[-1].rank} is outside world_size {world_size}")
    return tuple(sources)


def resolved_from_proto(msg: pb.ResolveResponse, limits: CatalogLimits | None = DEFAULT_LIMITS) -> Resolved:
    if not msg.HasField("info"):
        raise ConfigError("resolve response without version info")
    info = version_from_proto(msg.info, limits)
    if limits is not None:
        bounds.text("layout_digest", msg.layout_digest, limits.max_short_chars, required=False)
    return Resolved(
        info=info,
        sources=sources_from_proto(msg.sources, info.world_size, limits),
        layout_digest=msg.layout_digest,
        tensors_omitted=msg.tensors_omitted,
    )


# --- serialized form (what the Redis store keeps) ------------------------------------------------------


def _parse(cls: type[Message], data: bytes) -> Message:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise ConfigError(f"corrupt serialized {cls.__name__}: {exc}") from exc
    return msg


def model_to_bytes(model: ModelMeta) -> bytes:
    # Deterministic, so two equal models give equal bytes and the store can compare them as strings.
    return model_to_proto(model).SerializeToString(deterministic=True)


def model_from_bytes(data: bytes) -> ModelMeta:
    return model_from_proto(_parse(pb.ModelMeta, data), None)


def source_to_bytes(source: SourceRecord) -> bytes:
    return source_to_proto(source).SerializeToString(deterministic=True)


def source_from_bytes(data: bytes) -> SourceRecord:
    # The store's own record, bounded by the server's limits when it was published.
    return source_from_proto(_parse(pb.SourceRecord, data), None)


# --- layout digests ----------------------------------------------------------------------------------


def source_encodings(source: SourceRecord) -> tuple[bytes, bytes, str]:
    """(record bytes, head bytes, source layout digest) of one source, from one protobuf encoding.

    The head is the record without its tensor descriptors: what `Resolve` sends when the caller's
    `known_layout` matches. The source layout digest is the SHA-256 (hex) of the deterministic
    encoding of its rank, coords and tensor descriptors only: region addresses and the NIXL agent
    change with every trainer restart, and a plan does not depend on them.
    """
    msg = source_to_proto(source)
    layout = pb.SourceRecord(rank=msg.rank, coords=msg.coords, tensors=msg.tensors)
    head = pb.SourceRecord()
    head.CopyFrom(msg)
    head.ClearField("tensors")
    return (
        msg.SerializeToString(deterministic=True),
        head.SerializeToString(deterministic=True),
        hashlib.sha256(layout.SerializeToString(deterministic=True)).hexdigest(),
    )
