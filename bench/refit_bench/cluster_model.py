"""Cluster-scale refit traffic from the real planner: bytes per NIC, modelled time and its lower bound.

Every engine rank's plan comes from `refit.plan.planner.plan_refit` over the synthesized trainer
sources, with the stripe the receiver uses (`refit.plan.planner.stripe`). Engine replicas share one
layout, so by default each distinct engine position (TP rank) is planned once and its plan is reused
for the other replicas by symmetry: a replica whose stripe is larger by `d` takes, from every set of
equal trainer replicas, the member `d` places further on. That is exactly what the planner's
striping does (the run a need falls into does not depend on the stripe), so bytes per trainer rank
are exact; `exact=True` plans every engine rank instead.

Network model: one NIC per GPU, `nic_gbps` per direction, full duplex, non-blocking fabric, trainer
and engine on separate nodes (or, `colocated`, GPU i of both on the same node, where same-node
traffic rides NVLink). Modelled time is the most loaded link's bytes over its bandwidth.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from refit.dtypes import DTYPE_SIZES
from refit.errors import ConfigError
from refit.plan.planner import Plan, plan_refit, stripe
from refit.plan.targets import EngineLayout, Scheme
from refit.types import ModelMeta, SourceRecord, TensorDesc

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineFleet:
    """`replicas` engines of `tp` GPUs each; experts over `ep` ranks, split `tp // ep` ways within each.

    Not the library's `refit.engines.EngineSpec` (one engine rank's model): the shape of a whole
    fleet, from which each rank's `EngineLayout` and stripe follow.
    """

    tp: int = 1
    ep: int = 1
    replicas: int = 1
    gpus_per_node: int = 8
    scheme: Scheme = Scheme.MEGATRON

    def __post_init__(self) -> None:
        if self.replicas <= 0 or self.gpus_per_node <= 0:
            raise ConfigError(f"engine replicas {self.replicas} and gpus_per_node {self.gpus_per_node} must be > 0")
        # The library checks the sizes and the scheme; only the expert split below is this model's own.
        probe = EngineLayout(tp_size=self.tp, ep_size=self.ep, scheme=self.scheme)
        if self.tp % self.ep:
            raise ConfigError(f"engine TP {self.tp} must be a multiple of EP {self.ep} (experts split TP/EP ways)")
        object.__setattr__(self, "scheme", probe.scheme)

    @property
    def world(self) -> int:
        return self.tp * self.replicas

    def layout(self, tp_rank: int) -> EngineLayout:
        per = self.tp // self.ep
        return EngineLayout(
            tp_rank=tp_rank,
            tp_size=self.tp,
            ep_rank=tp_rank // per,
            ep_size=self.ep,
            expert_tp_rank=tp_rank % per,
            expert_tp_size=per,
            scheme=self.scheme,
        )

    def stripe(self, replica: int, tp_rank: int) -> int:
        """The receiver's stripe for this engine rank: the library's one rule."""
        return stripe(replica=replica, tp_rank=tp_rank, tp_size=self.tp)

    def describe(self) -> str:
        return f"{self.replicas} x TP{self.tp} EP{self.ep} ({self.world} GPUs, {self.scheme.value} names)"


@dataclass(frozen=True, kw_only=True, slots=True)
class Fabric:
    nic_gbps: float = 50.0  # GB/s per GPU NIC, per direction
    nvlink_gbps: float = 450.0  # GB/s per GPU, per direction
    colocated: bool = False


@dataclass(frozen=True, kw_only=True)
class Traffic:
    """Bytes per link of one whole refit (every engine rank of every replica)."""

    sent: list[int]  # per trainer GPU, over its NIC
    received: list[int]  # per engine GPU, over its NIC
    nvlink_sent: list[int]
    nvlink_received: list[int]
    target_bytes: int  # what the engine ranks hold after the refit, summed
    reads: int  # transfer descriptors, summed over engine ranks
    planned: int  # plan_refit calls
    plan_seconds: float
    per_pair: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)  # (trainer, engine) -> bytes

    def seconds(self, fabric: Fabric) -> float:
        nic = max(max(self.sent), max(self.received)) / (fabric.nic_gbps * 1e9)
        nvl = max(max(self.nvlink_sent), max(self.nvlink_received)) / (fabric.nvlink_gbps * 1e9)
        return max(nic, nvl)

    def lower_bound(self, fabric: Fabric) -> float:
        """NIC bytes over the aggregate NIC bandwidth of the busier side."""
        bw = fabric.nic_gbps * 1e9
        return max(sum(self.sent) / (len(self.sent) * bw), sum(self.received) / (len(self.received) * bw))


def first_replica_only(sources: Sequence[SourceRecord]) -> list[SourceRecord]:
    """The sources with every shard kept only on the lowest rank that publishes it (no striping)."""
    seen: set[tuple[object, ...]] = set()
    out = []
    for src in sorted(sources, key=lambda s: s.rank):
        keep = []
        for d in src.tensors:
            key = (d.name, d.partition_dim, d.partition_stride, d.offset, d.local_shape)
            if key not in seen:
                seen.add(key)
                keep.append(d)
        out.append(
            SourceRecord(
                rank=src.rank,
                coords=src.coords,
                agent_name=src.agent_name,
                agent_metadata=src.agent_metadata,
                regions=src.regions,
                tensors=tuple(keep),
            )
        )
    return out


class _Holders:
    """Which trainer ranks hold given rows of a tensor (the planner's sets of equal replicas)."""

    def __init__(self, sources: Sequence[SourceRecord]) -> None:
        self._by_name: dict[str, list[tuple[int, TensorDesc]]] = defaultdict(list)
        for src in sources:
            for d in src.tensors:
                self._by_name[d.name].append((src.rank, d))
        self._cache: dict[tuple[str, int | None, int, int], tuple[int, ...]] = {}

    def group(self, tensor: str, dim: int | None, start: int, stop: int) -> tuple[int, ...]:
        key = (tensor, dim, start, stop)
        got = self._cache.get(key)
        if got is None:
            ranks = set()
            for rank, d in self._by_name[tensor]:
                if dim is None or d.partition_dim == -1:
                    ranks.add(rank)
                    continue
                part_g, part_l = d.global_shape[dim] // d.partition_stride, d.local_shape[dim] // d.partition_stride
                if any(
                    k * part_g + d.offset <= start and stop <= k * part_g + d.offset + part_l
                    for k in range(d.partition_stride)
                ):
                    ranks.add(rank)
            got = self._cache[key] = tuple(sorted(ranks))
        return got


def _target_bytes(plan: Plan) -> int:
    return sum(math.prod(t.shape) * DTYPE_SIZES[t.dtype] for t in plan.targets)


def simulate(
    *,
    model: ModelMeta,
    sources: Sequence[SourceRecord],
    trainer_gpus_per_node: int,
    engine: EngineFleet,
    fabric: Fabric,
    stripe: bool = True,
    exact: bool = False,
    progress: Callable[[int], object] | None = None,
) -> Traffic:
    """Plan every engine rank (or one per position, see the module docstring) and add up the links.

    `stripe=False` plans against `first_replica_only(sources)`: every byte from the first copy.
    `progress(n)` is called after each plan_refit call with the number of engine ranks it covered.
    """
    srcs = list(sources) if stripe else first_replica_only(sources)
    holders = _Holders(srcs)
    n_trainer = max(s.rank for s in srcs) + 1
    by_engine: list[dict[int, int]] = [defaultdict(int) for _ in range(engine.world)]
    target_bytes = reads = planned = 0
    t0 = time.perf_counter()
    for t in range(engine.tp):
        replicas = range(engine.replicas) if exact else range(1)
        for k in replicas:
            plan = plan_refit(model=model, sources=srcs, layout=engine.layout(t), stripe=engine.stripe(k, t))
            planned += 1
            covered = 1 if exact else engine.replicas
            target_bytes += _target_bytes(plan) * covered
            reads += len(plan.reads) * covered
            if exact:
                for rank, nbytes in plan.bytes_by_rank.items():
                    by_engine[k * engine.tp + t][rank] += nbytes
            else:
                # Bytes per (set of equal replicas, index of the chosen member): shift the index per replica.
                per_group: dict[tuple[tuple[int, ...], int], int] = defaultdict(int)
                for p in plan.pieces:
                    group = holders.group(p.tensor, p.dim, p.start, p.stop)
                    per_group[(group, group.index(p.rank))] += p.nbytes
                base = engine.stripe(0, t)
                for r in range(engine.replicas):
                    shift = engine.stripe(r, t) - base
                    dest = by_engine[r * engine.tp + t]
                    for (group, index), nbytes in per_group.items():
                        dest[group[(index + shift) % len(group)]] += nbytes
            if progress is not None:
                progress(covered)
    seconds = time.perf_counter() - t0
    logger.info("planned %d engine ranks with %d plan_refit calls in %.1f s", engine.world, planned, seconds)
    sent, received = [0] * n_trainer, [0] * engine.world
    nvl_sent, nvl_received = [0] * n_trainer, [0] * engine.world
    per_pair: dict[tuple[int, int], int] = {}
    for g, flows in enumerate(by_engine):
        for rank, nbytes in flows.items():
            per_pair[(rank, g)] = nbytes
            if fabric.colocated and rank // trainer_gpus_per_node == g // engine.gpus_per_node:
                nvl_sent[rank] += nbytes
                nvl_received[g] += nbytes
            else:
                sent[rank] += nbytes
                received[g] += nbytes
    return Traffic(
        sent=sent,
        received=received,
        nvlink_sent=nvl_sent,
        nvlink_received=nvl_received,
        target_bytes=target_bytes,
        reads=reads,
        planned=planned,
        plan_seconds=seconds,
        per_pair=per_pair,
    )
