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
traffic rides NVLink). Descriptors cost time (`refit.plan.cost`): each engine rank pays its
descriptors' time on the link they cross, on top of its bytes; the trainer side answers RDMA READs
in its NIC and pays bytes only. Every plan is made for the NIC's cost, so the planner's choices
(holes read along, strided slices read as their enclosing block) are the ones this link favours.
Modelled time is the slowest link: bytes over bandwidth, plus descriptors on the engine side.
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
from refit.plan.cost import IB_RAIL, NVLINK, LinkCost
from refit.plan.planner import MAX_OVERREAD, Plan, plan_refit, stripe
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
    nic_descriptor_us: float = IB_RAIL.descriptor_s * 1e6  # per descriptor an engine rank posts over its NIC
    nvlink_descriptor_us: float = NVLINK.descriptor_s * 1e6  # per descriptor over NVLink (colocated only)

    @property
    def nic(self) -> LinkCost:
        return LinkCost(bandwidth_Bps=self.nic_gbps * 1e9, descriptor_s=self.nic_descriptor_us * 1e-6)

    @property
    def nvlink(self) -> LinkCost:
        return LinkCost(bandwidth_Bps=self.nvlink_gbps * 1e9, descriptor_s=self.nvlink_descriptor_us * 1e-6)


@dataclass(frozen=True, kw_only=True)
class Traffic:
    """Bytes and descriptors per link of one whole refit (every engine rank of every replica).

    Bytes per link are wire bytes: what the planner reads, holes and enclosing blocks included.
    """

    sent: list[int]  # per trainer GPU, over its NIC
    received: list[int]  # per engine GPU, over its NIC
    nvlink_sent: list[int]
    nvlink_received: list[int]
    descriptors: list[int]  # per engine GPU, over its NIC
    nvlink_descriptors: list[int]  # per engine GPU, over NVLink
    staging: list[int]  # staging bytes per engine GPU
    needed_nic_bytes: int  # bytes the engines need that cross NICs (the lower bound's bytes)
    target_bytes: int  # what the engine ranks hold after the refit, summed
    reads: int  # planned reads (a strided read counted once), summed over engine ranks
    planned: int  # plan_refit calls
    plan_seconds: float
    per_pair: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)  # (trainer, engine) -> needed
    per_pair_wire: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)  # ... -> wire bytes

    def engine_seconds(self, fabric: Fabric, *, descriptors: bool = True) -> list[float]:
        """Each engine GPU's time: its busier link's bytes, plus (by default) that link's descriptors."""
        nic, nvl, on = fabric.nic, fabric.nvlink, int(descriptors)
        return [
            max(
                nic.seconds(nbytes=self.received[g], descriptors=on * self.descriptors[g]),
                nvl.seconds(nbytes=self.nvlink_received[g], descriptors=on * self.nvlink_descriptors[g]),
            )
            for g in range(len(self.received))
        ]

    def seconds(self, fabric: Fabric, *, descriptors: bool = True) -> float:
        """The slowest link: trainer NICs and NVLink by bytes, engine ranks by bytes and descriptors."""
        trainer = max(max(self.sent) / fabric.nic.bandwidth_Bps, max(self.nvlink_sent) / fabric.nvlink.bandwidth_Bps)
        return max(trainer, max(self.engine_seconds(fabric, descriptors=descriptors)))

    def descriptor_seconds(self, fabric: Fabric) -> float:
        """The most any engine rank spends on descriptors."""
        nic, nvl = fabric.nic.descriptor_s, fabric.nvlink.descriptor_s
        return max(n * nic + m * nvl for n, m in zip(self.descriptors, self.nvlink_descriptors, strict=True))

    def lower_bound(self, fabric: Fabric) -> float:
        """Needed NIC bytes over the aggregate NIC bandwidth of the busier side (no descriptors)."""
        bw = fabric.nic.bandwidth_Bps
        return self.needed_nic_bytes / (min(len(self.sent), len(self.received)) * bw)


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


Key = tuple[tuple[int, ...], int]  # (set of equal replicas, index of the member a plan reads from)


def _per_key(plan: Plan, holders: _Holders) -> dict[Key, list[int]]:
    """Needed bytes, wire bytes and descriptors of `plan`, per set of equal replicas and chosen member.

    A read's wire bytes go to its pieces, each taking its staged span and the hole after it; its
    descriptors go to its first piece, less one where its first block merges with the last block of
    the read before it (as `refit.plan.records.count_descriptors` counts them).
    """
    out: dict[Key, list[int]] = defaultdict(lambda: [0, 0, 0])
    pieces = sorted(plan.pieces, key=lambda p: p.local_offset)
    reads = sorted(plan.reads, key=lambda r: r.local_offset)
    ends = {(r.rank, r.region, r.local_offset + r.nbytes, r.remote_offset + (r.count - 1) * r.remote_stride
             + r.block_bytes) for r in reads if r.descriptors}  # fmt: skip
    i = 0
    for r in reads:
        end, keys = r.local_offset + r.nbytes, []
        while i < len(pieces) and pieces[i].local_offset < end:
            p = pieces[i]
            group = holders.group(p.tensor, p.dim, p.start, p.stop)
            keys.append((group, group.index(p.rank)))
            out[keys[-1]][0] += p.nbytes
            following = pieces[i + 1].local_offset if i + 1 < len(pieces) else end
            out[keys[-1]][1] += min(following, end) - p.local_offset
            i += 1
        merged = (r.rank, r.region, r.local_offset, r.remote_offset) in ends
        out[keys[0]][2] += r.descriptors - int(merged and r.descriptors > 0)
    return out


def simulate(
    *,
    model: ModelMeta,
    sources: Sequence[SourceRecord],
    trainer_gpus_per_node: int,
    engine: EngineFleet,
    fabric: Fabric,
    stripe: bool = True,
    exact: bool = False,
    max_overread: float = MAX_OVERREAD,
    progress: Callable[[int], object] | None = None,
) -> Traffic:
    """Plan every engine rank (or one per position, see the module docstring) and add up the links.

    Each plan is priced for the fabric's NIC (`plan_refit(cost=fabric.nic, max_overread=...)`).
    `stripe=False` plans against `first_replica_only(sources)`: every byte from the first copy.
    `progress(n)` is called after each plan_refit call with the number of engine ranks it covered.
    """
    srcs = list(sources) if stripe else first_replica_only(sources)
    holders = _Holders(srcs)
    n_trainer = max(s.rank for s in srcs) + 1
    # Per engine GPU: trainer rank -> [needed bytes, wire bytes, descriptors].
    by_engine: list[dict[int, list[int]]] = [defaultdict(lambda: [0, 0, 0]) for _ in range(engine.world)]
    staging = [0] * engine.world
    target_bytes = reads = planned = 0
    t0 = time.perf_counter()
    for t in range(engine.tp):
        for k in range(engine.replicas) if exact else range(1):
            plan = plan_refit(
                model=model, sources=srcs, layout=engine.layout(t), stripe=engine.stripe(k, t), cost=fabric.nic,
                max_overread=max_overread,
            )  # fmt: skip
            planned += 1
            covered = 1 if exact else engine.replicas
            target_bytes += _target_bytes(plan) * covered
            reads += len(plan.reads) * covered
            # Per (set of equal replicas, chosen member): a replica whose stripe is larger by d reads
            # from the member d places further on (exact: only this replica, shift 0).
            per_key = _per_key(plan, holders)
            base = engine.stripe(k, t)
            for r in [k] if exact else range(engine.replicas):
                shift = engine.stripe(r, t) - base
                dest = by_engine[r * engine.tp + t]
                staging[r * engine.tp + t] = plan.staging_bytes
                for (group, index), counts in per_key.items():
                    into = dest[group[(index + shift) % len(group)]]
                    for j, n in enumerate(counts):
                        into[j] += n
            if progress is not None:
                progress(covered)
    seconds = time.perf_counter() - t0
    logger.info("planned %d engine ranks with %d plan_refit calls in %.1f s", engine.world, planned, seconds)
    sent, received, descriptors = [0] * n_trainer, [0] * engine.world, [0] * engine.world
    nvl_sent, nvl_received, nvl_descriptors = [0] * n_trainer, [0] * engine.world, [0] * engine.world
    per_pair: dict[tuple[int, int], int] = {}
    per_pair_wire: dict[tuple[int, int], int] = {}
    needed_nic = 0
    for g, flows in enumerate(by_engine):
        for rank, (needed, wire, n) in flows.items():
            per_pair[(rank, g)], per_pair_wire[(rank, g)] = needed, wire
            if fabric.colocated and rank // trainer_gpus_per_node == g // engine.gpus_per_node:
                nvl_sent[rank] += wire
                nvl_received[g] += wire
                nvl_descriptors[g] += n
            else:
                sent[rank] += wire
                received[g] += wire
                descriptors[g] += n
                needed_nic += needed
    return Traffic(
        sent=sent,
        received=received,
        nvlink_sent=nvl_sent,
        nvlink_received=nvl_received,
        descriptors=descriptors,
        nvlink_descriptors=nvl_descriptors,
        staging=staging,
        needed_nic_bytes=needed_nic,
        target_bytes=target_bytes,
        reads=reads,
        planned=planned,
        plan_seconds=seconds,
        per_pair=per_pair,
        per_pair_wire=per_pair_wire,
    )
