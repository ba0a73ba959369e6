"""Bad catalog requests: each breaks one bound of `refit.catalog.bounds` in a valid Publish request.

`PUBLISH_MUTATIONS` maps a label to (the field the refusal must name, a function that breaks a copy of
a valid `PublishRequest` in place). The bounds test sends each one once to a real server; the fuzz
test draws them among valid calls. Limits that take a large message to exceed are tested against
`SMALL_LIMITS`, which a test server is started with.
"""

from __future__ import annotations

from collections.abc import Callable

from refit.catalog import wire
from refit.catalog.bounds import CatalogLimits
from refit.proto import catalog_pb2 as pb
from refit.types import ModelMeta, SourceRecord

# Small enough that a request over each limit stays a few kilobytes.
SMALL_LIMITS = CatalogLimits(
    max_world_size=64,
    max_tensors_per_record=16,
    max_regions_per_record=4,
    max_name_chars=64,
    max_agent_name_chars=32,
    max_agent_metadata_bytes=1024,
    max_message_bytes=256 * 1024,
)

Mutation = Callable[[pb.PublishRequest], None]


def publish_request(
    name: str, version: int, world_size: int, model: ModelMeta, source: SourceRecord
) -> pb.PublishRequest:
    return pb.PublishRequest(
        name=name,
        version=version,
        world_size=world_size,
        model=wire.model_to_proto(model),
        source=wire.source_to_proto(source),
    )


def _set(path: str, value: object) -> Mutation:
    def mutate(req: pb.PublishRequest) -> None:
        *parents, last = path.split(".")
        target: object = req
        for p in parents:
            target = target[int(p)] if p.isdigit() else getattr(target, p)  # type: ignore[index]
        setattr(target, last, value)

    return mutate


def _shape(which: str, values: list[int]) -> Mutation:
    def mutate(req: pb.PublishRequest) -> None:
        t = req.source.tensors[0]
        getattr(t, which)[:] = values

    return mutate


def _both_shapes(values: list[int]) -> Mutation:
    def mutate(req: pb.PublishRequest) -> None:
        t = req.source.tensors[2]  # the replicated one: local == global
        t.local_shape[:] = values
        t.global_shape[:] = values

    return mutate


def _extend(what: str, n: int) -> Mutation:
    def mutate(req: pb.PublishRequest) -> None:
        items = getattr(req.source, what)
        first = type(items[0])()
        first.CopyFrom(items[-1])
        for i in range(n):
            extra = items.add()
            extra.CopyFrom(first)
            if what == "regions":
                extra.index = 100 + i

    return mutate


def _clear(field: str) -> Mutation:
    def mutate(req: pb.PublishRequest) -> None:
        *parents, last = field.split(".")
        target: object = req
        for p in parents:
            target = getattr(target, p)
        target.ClearField(last)  # type: ignore[attr-defined]

    return mutate


# label -> (what the refusal must name, the mutation). The base request is a 2-tensor-shard record of
# `catalog_samples.source(rank, tp_size=2)`: tensors[0] column (dim 0), [1] row (dim 1), [2] replicated in region 1.
PUBLISH_MUTATIONS: dict[str, tuple[str, Mutation]] = {
    "empty name": ("model name", _set("name", "")),
    "long name": ("model name", _set("name", "m" * 65)),
    "negative version": ("version", _set("version", -1)),
    "version past 2**53": ("version", _set("version", 2**53)),
    "zero world": ("world_size", _set("world_size", 0)),
    "huge world": ("world_size", _set("world_size", 65)),
    "rank outside world": ("source.rank", _set("source.rank", 2)),
    "negative rank": ("source.rank", _set("source.rank", -1)),
    "no model": ("model", _clear("model")),
    "no source": ("source", _clear("source")),
    "no coords": ("source.coords", _clear("source.coords")),
    "empty agent": ("source.agent_name", _set("source.agent_name", "")),
    "long agent": ("source.agent_name", _set("source.agent_name", "a" * 33)),
    "big metadata": ("source.agent_metadata", _set("source.agent_metadata", b"x" * 1025)),
    "tp rank outside": ("tp_rank", _set("source.coords.tp_rank", 5)),
    "huge tp size": ("source.coords.tp_size", _set("source.coords.tp_size", 65)),
    "too many tensors": ("source.tensors", _extend("tensors", 14)),
    "too many regions": ("source.regions", _extend("regions", 3)),
    "long tensor name": ("source.tensors[0].name", _set("source.tensors.0.name", "t" * 65)),
    "empty tensor name": ("source.tensors[0]", _set("source.tensors.0.name", "")),
    "unknown dtype": ("source.tensors[0]", _set("source.tensors.0.dtype", "float128")),
    "long dtype": ("source.tensors[0].dtype", _set("source.tensors.0.dtype", "f" * 65)),
    "unspecified role": ("source.tensors[0].role", _set("source.tensors.0.role", 0)),
    "unknown role": ("source.tensors[0].role", _set("source.tensors.0.role", 99)),
    "negative dim": ("source.tensors[2].local_shape[0]", _both_shapes([-64])),
    "huge dim": ("source.tensors[2].local_shape[0]", _both_shapes([2**41])),
    "too many dims": ("source.tensors[0].local_shape", _shape("local_shape", [1] * 9)),
    "rank mismatch": ("source.tensors[0]", _shape("local_shape", [128])),
    "local over global": ("source.tensors[0]", _shape("local_shape", [512, 64])),
    "other dim differs": ("source.tensors[0].local_shape[1]", _shape("local_shape", [128, 32])),
    "huge global tensor": ("source.tensors[2].global_shape", _both_shapes([2**40, 2**20])),
    "zero stride": ("source.tensors[0]", _set("source.tensors.0.partition_stride", 0)),
    "huge stride": ("source.tensors[0]", _set("source.tensors.0.partition_stride", 2**20)),
    "partition dim out of range": ("source.tensors[0]", _set("source.tensors.0.partition_dim", 5)),
    "offset past global": ("source.tensors[0]", _set("source.tensors.0.offset", 10**6)),
    "unknown region": ("source.tensors[0].region", _set("source.tensors.0.region", 7)),
    "negative region": ("source.tensors[0]", _set("source.tensors.0.region", -1)),
    "bytes past region": ("source.tensors[1]", _set("source.tensors.1.byte_offset", 2**30)),
    "negative byte offset": ("source.tensors[0]", _set("source.tensors.0.byte_offset", -8)),
    "empty region": ("source.regions[0]", _set("source.regions.0.nbytes", 0)),
    "huge region": ("source.regions[0].nbytes", _set("source.regions.0.nbytes", 2**45)),
    "region wraps": ("source.regions[0]", _set("source.regions.0.addr", 2**64 - 16)),
    "duplicate region": ("source.regions[1].index", _set("source.regions.1.index", 0)),
    "unknown device": ("source.regions[0]", _set("source.regions.0.device", "tpu")),
    "negative device id": ("source.regions[0].device_id", _set("source.regions.0.device_id", -1)),
    "bad model dtype": ("model", _set("model.params_dtype", "float7")),
    "zero layers": ("model", _set("model.num_layers", 0)),
    "huge hidden": ("model.hidden_size", _set("model.hidden_size", 2**40)),
    "long architecture": ("model.architecture", _set("model.architecture", "x" * 65)),
    "groups do not divide heads": ("model", _set("model.num_query_groups", 3)),
}
