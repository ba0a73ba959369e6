"""Conversion between the catalog's protobuf messages and `refit.types` values, both directions.

This module is the only place that knows both representations; the client and the server (and the
Redis store, which keeps serialized protobuf) go through it. Validation is the dataclasses' own
`__post_init__`: any proto that does not make a valid value raises `ConfigError`, and so does an
unspecified (0) enum, which is what a sender that forgot to set a field produces.
"""

from __future__ import annotations

import hashlib

from google.protobuf.message import DecodeError, Message

from refit.catalog.values import Resolved
from refit.errors import ConfigError
from refit.proto import catalog_pb2 as pb
from refit.types import (
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
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# Enum values are named after the Python members with the proto enum's prefix; building the maps from
# the names makes an enum member missing from the .proto fail at import, not at the first publish.
_ROLE_TO_PB: dict[Role, int] = {r: pb.Role.Value(f"ROLE_{r.name}") for r in Role}
_ROLE_FROM_PB: dict[int, Role] = {v: r for r, v in _ROLE_TO_PB.items()}
_STATE_TO_PB: dict[VersionState, int] = {s: pb.VersionState.Value(f"VERSION_STATE_{s.name}") for s in VersionState}
_STATE_FROM_PB: dict[int, VersionState] = {v: s for s, v in _STATE_TO_PB.items()}

_COORD_KINDS = ("tp", "pp", "ep", "dp", "etp", "edp")
_COORD_FIELDS = tuple(f"{kind}_{what}" for kind in _COORD_KINDS for what in ("rank", "size"))
_MODEL_FIELDS = tuple(ModelMeta.__dataclass_fields__)


def _build(cls: type[Message], **fields: object) -> Message:
    """Construct a proto message; out-of-range or mistyped values become ConfigError."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot encode {cls.__name__}: {exc}") from exc


# --- enums ----------------------------------------------------------------------------------------


def role_to_proto(role: Role) -> int:
    return _ROLE_TO_PB[Role(role)]


def role_from_proto(value: int) -> Role:
    role = _ROLE_FROM_PB.get(value)
    if role is None:
        raise ConfigError(f"tensor role {pb.Role.Name(value) if value in pb.Role.values() else value} is not valid")
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


def coords_from_proto(msg: pb.ParallelCoords) -> ParallelCoords:
    values = {f: getattr(msg, f) for f in _COORD_FIELDS}
    for kind in ("etp", "edp"):  # absent in records written before expert coordinates existed
        values[f"{kind}_size"] = values[f"{kind}_size"] or 1
    return ParallelCoords(**values)


def model_to_proto(model: ModelMeta) -> pb.ModelMeta:
    return _build(pb.ModelMeta, **{f: getattr(model, f) for f in _MODEL_FIELDS})


def model_from_proto(msg: pb.ModelMeta) -> ModelMeta:
    return ModelMeta(**{f: getattr(msg, f) for f in _MODEL_FIELDS})


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


def tensor_from_proto(msg: pb.TensorDesc) -> TensorDesc:
    return TensorDesc(
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


def region_to_proto(r: Region) -> pb.Region:
    return _build(pb.Region, index=r.index, addr=r.addr, nbytes=r.nbytes, device=r.device, device_id=r.device_id)


def region_from_proto(msg: pb.Region) -> Region:
    return Region(index=msg.index, addr=msg.addr, nbytes=msg.nbytes, device=msg.device, device_id=msg.device_id)


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
    )


def source_from_proto(msg: pb.SourceRecord) -> SourceRecord:
    if not msg.HasField("coords"):
        raise ConfigError(f"rank {msg.rank}: source record without coords")
    return SourceRecord(
        rank=msg.rank,
        coords=coords_from_proto(msg.coords),
        agent_name=msg.agent_name,
        agent_metadata=bytes(msg.agent_metadata),
        regions=tuple(region_from_proto(r) for r in msg.regions),
        tensors=tuple(tensor_from_proto(t) for t in msg.tensors),
        digests=DigestSet(algorithm=msg.digests.algorithm, values=bytes(msg.digests.values)),
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
    )


def version_from_proto(msg: pb.VersionInfo) -> VersionInfo:
    if not msg.HasField("model"):
        raise ConfigError(f"{msg.name} v{msg.version}: version info without model")
    return VersionInfo(
        name=msg.name,
        version=msg.version,
        state=state_from_proto(msg.state),
        world_size=msg.world_size,
        published_ranks=tuple(msg.published_ranks),
        model=model_from_proto(msg.model),
        created_at=msg.created_at,
        ready_at=msg.ready_at,
    )


def claim_to_proto(c: Claim) -> pb.Claim:
    return _build(pb.Claim, name=c.name, rank=c.rank, agent_name=c.agent_name, claimed_at=c.claimed_at)


def claim_from_proto(msg: pb.Claim) -> Claim:
    return Claim(name=msg.name, rank=msg.rank, agent_name=msg.agent_name, claimed_at=msg.claimed_at)


def resolved_to_proto(r: Resolved) -> pb.ResolveResponse:
    return _build(
        pb.ResolveResponse,
        info=version_to_proto(r.info),
        sources=[source_to_proto(s) for s in r.sources],
        layout_digest=r.layout_digest,
        tensors_omitted=r.tensors_omitted,
    )


def resolved_from_proto(msg: pb.ResolveResponse) -> Resolved:
    if not msg.HasField("info"):
        raise ConfigError("resolve response without version info")
    return Resolved(
        info=version_from_proto(msg.info),
        sources=tuple(sorted((source_from_proto(s) for s in msg.sources), key=lambda s: s.rank)),
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
    return model_from_proto(_parse(pb.ModelMeta, data))


def source_to_bytes(source: SourceRecord) -> bytes:
    return source_to_proto(source).SerializeToString(deterministic=True)


def source_from_bytes(data: bytes) -> SourceRecord:
    return source_from_proto(_parse(pb.SourceRecord, data))


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
