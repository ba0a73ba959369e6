"""Bounds on everything that crosses the catalog's wire: `CatalogLimits` and the checks that apply them.

The catalog server applies them to every request before anything reaches a store, and a receiver
applies them (with the defaults) to every record it gets back, before it plans a read: a malicious or
broken peer can neither grow the catalog without bound nor make a receiver read outside a region a
trainer registered, or size staging from absurd shapes. A violation is a `ConfigError` naming the
field (`source.tensors[3].local_shape[1]`), which the server answers with INVALID_ARGUMENT.

Pure values only (no protobuf): `refit.catalog.wire` calls the scalar checks on a message's fields
while it converts it, so oversized strings and lists are refused before a value is built from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

from refit.errors import ConfigError
from refit.types import ModelMeta, ParallelCoords, Region, SourceRecord, TensorDesc

_MIB = 1024 * 1024
UINT64_END = 2**64


@dataclass(frozen=True, kw_only=True, slots=True)
class CatalogLimits:
    """What one catalog request (and one record a receiver gets back) may carry.

    The defaults fit the largest models refit targets with room to spare: DeepSeek-V3 or Kimi-K2
    published by one rank without expert parallelism is ~60k tensor descriptors (~10 MB encoded);
    the `refit-bench plan` presets run 256 trainer ranks.
    """

    max_message_bytes: int = 256 * _MIB  # one gRPC message, either direction (the server's receive limit)
    max_world_size: int = 65_536  # trainer ranks of one version (and any parallel size)
    # Redis keeps version numbers as sorted-set scores (doubles): beyond 2**53 two versions could tie.
    max_version: int = 2**53 - 1
    max_tensors_per_record: int = 262_144
    max_regions_per_record: int = 4_096
    max_dims: int = 8
    max_dim: int = 2**40  # elements along one dimension
    max_tensor_bytes: int = 2**50  # a global tensor, all shards together
    max_region_bytes: int = 2**44  # one registered block (16 TiB)
    max_device_id: int = 65_535
    max_model_dim: int = 2**31 - 1  # any integer of ModelMeta (layers, hidden size, vocabulary, ...)
    max_partition_stride: int = 64
    max_name_chars: int = 1_024  # model names and tensor names
    max_agent_name_chars: int = 256
    max_short_chars: int = 64  # dtype, architecture, device, layout digest
    max_agent_metadata_bytes: int = 16 * _MIB

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"CatalogLimits.{f.name} must be a positive int, got {value!r}")
        if self.max_version > 2**53 - 1:
            raise ConfigError(f"CatalogLimits.max_version must be <= 2**53 - 1 (Redis scores), got {self.max_version}")


DEFAULT_LIMITS = CatalogLimits()


def shown(value: str, limit: int = 60) -> str:
    """A string for an error message: refused input is never echoed whole."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


# --- scalar checks (the wire calls them on message fields) -----------------------------------------


def text(field: str, value: str, max_chars: int, *, required: bool = True) -> str:
    if len(value) > max_chars:
        raise ConfigError(f"{field}: {len(value)} characters, over the limit of {max_chars}")
    if required and not value:
        raise ConfigError(f"{field} must be non-empty")
    return value


def blob(field: str, value: bytes, max_bytes: int) -> bytes:
    if len(value) > max_bytes:
        raise ConfigError(f"{field}: {len(value)} bytes, over the limit of {max_bytes}")
    return value


def count(field: str, n: int, limit: int) -> None:
    if n > limit:
        raise ConfigError(f"{field}: {n} entries, over the limit of {limit}")


def integer(field: str, value: int, low: int, high: int) -> int:
    if value < low:
        raise ConfigError(f"{field} must be >= {low}, got {value}")
    if value > high:
        raise ConfigError(f"{field} must be <= {high}, got {value}")
    return value


def name(field: str, value: str, limits: CatalogLimits) -> str:
    return text(field, value, limits.max_name_chars)


def version(field: str, value: int, limits: CatalogLimits) -> int:
    return integer(field, value, 0, limits.max_version)


def rank(field: str, value: int, limits: CatalogLimits) -> int:
    return integer(field, value, 0, limits.max_world_size - 1)


def world_size(field: str, value: int, limits: CatalogLimits) -> int:
    return integer(field, value, 1, limits.max_world_size)


def agent_name(field: str, value: str, limits: CatalogLimits) -> str:
    return text(field, value, limits.max_agent_name_chars)


# --- value checks (after conversion) ------------------------------------------------------------------


def check_model(model: ModelMeta, limits: CatalogLimits, field: str = "model") -> ModelMeta:
    for f in fields(model):
        value = getattr(model, f.name)
        if isinstance(value, int) and not isinstance(value, bool):
            integer(f"{field}.{f.name}", value, 0, limits.max_model_dim)
    return model


def check_coords(coords: ParallelCoords, limits: CatalogLimits, field: str = "coords") -> ParallelCoords:
    for f in fields(coords):
        integer(f"{field}.{f.name}", getattr(coords, f.name), 0, limits.max_world_size)
    return coords


def check_dims(field: str, shape: Sequence[int], limits: CatalogLimits) -> None:
    """A shape's number of dims and each dim's size."""
    count(field, len(shape), limits.max_dims)
    if shape and (min(shape) < 0 or max(shape) > limits.max_dim):  # one pass; the loop only names the dim
        for d, size in enumerate(shape):
            integer(f"{field}[{d}]", size, 0, limits.max_dim)


def check_tensor(t: TensorDesc, limits: CatalogLimits, field: str, *, dims: bool = True) -> None:
    """Shape bounds and local/global consistency of one descriptor (the dataclass checks the rest).

    Runs once per descriptor of every record (60k for a big MoE rank): the common case is a few
    comparisons, and only a violation walks the dims to name one.
    """
    local, glob = t.local_shape, t.global_shape
    if dims:  # False: the wire checked them before building the value
        check_dims(f"{field}.local_shape", local, limits)
        check_dims(f"{field}.global_shape", glob, limits)
    if local != glob:
        for d, (size, full) in enumerate(zip(local, glob, strict=True)):
            if size != full and d != t.partition_dim:
                only = f"only partition_dim {t.partition_dim} may differ"
                raise ConfigError(f"{field}.local_shape[{d}] is {size}, global {full}: {only}")
            if size > full:
                raise ConfigError(f"{field}.local_shape[{d}] is {size}, over global {full}")
    if t.partition_stride > limits.max_partition_stride:
        integer(f"{field}.partition_stride", t.partition_stride, 1, limits.max_partition_stride)
    global_bytes = math.prod(glob) * t.itemsize
    if global_bytes > limits.max_tensor_bytes:
        raise ConfigError(f"{field}.global_shape: {global_bytes} bytes, over the limit of {limits.max_tensor_bytes}")


def check_parts(
    regions: tuple[Region, ...], tensors: tuple[TensorDesc, ...], limits: CatalogLimits, field: str = "source"
) -> None:
    """Bounds of a record's regions and descriptors, and every descriptor's bytes inside its region.

    Run before the record is built (so the error names the field, not the record's own check), on
    descriptors already through `check_tensor` (shapes bounded, so each range is the true extent of
    the shard's bytes).
    """
    count(f"{field}.regions", len(regions), limits.max_regions_per_record)
    count(f"{field}.tensors", len(tensors), limits.max_tensors_per_record)
    by_index: dict[int, Region] = {}
    for i, r in enumerate(regions):
        where = f"{field}.regions[{i}]"
        integer(f"{where}.index", r.index, 0, limits.max_regions_per_record - 1)
        integer(f"{where}.nbytes", r.nbytes, 1, limits.max_region_bytes)
        integer(f"{where}.device_id", r.device_id, 0, limits.max_device_id)
        if r.addr < 0 or r.addr + r.nbytes > UINT64_END:
            raise ConfigError(f"{where}: [{r.addr:#x}, +{r.nbytes}) wraps past the end of the address space")
        if r.index in by_index:
            raise ConfigError(f"{where}.index {r.index} is a duplicate")
        by_index[r.index] = r
    for i, t in enumerate(tensors):
        region = by_index.get(t.region)
        if region is None:
            raise ConfigError(f"{field}.tensors[{i}].region {t.region} names no region of the record")
        if t.byte_offset + t.nbytes > region.nbytes:
            where = f"{field}.tensors[{i}]"
            raise ConfigError(
                f"{where}: bytes [{t.byte_offset}, +{t.nbytes}) of {shown(t.name)} run past the end of "
                f"region {t.region} ({region.nbytes} bytes)"
            )


def check_source(source: SourceRecord, limits: CatalogLimits, field: str = "source") -> SourceRecord:
    """Every bound of one trainer rank's record (one built locally, or converted by the wire)."""
    rank(f"{field}.rank", source.rank, limits)
    check_coords(source.coords, limits, f"{field}.coords")
    agent_name(f"{field}.agent_name", source.agent_name, limits)
    blob(f"{field}.agent_metadata", source.agent_metadata, limits.max_agent_metadata_bytes)
    text(f"{field}.host", source.host, limits.max_short_chars, required=False)
    text(f"{field}.fence_shm", source.fence_shm, limits.max_short_chars, required=False)
    for i, t in enumerate(source.tensors):
        check_tensor(t, limits, f"{field}.tensors[{i}]")
    check_parts(source.regions, source.tensors, limits, field)
    return source
