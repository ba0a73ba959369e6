"""Plan a refit: which byte ranges an engine rank pulls from which trainer rank, and where they land.

Pure logic over catalog descriptors; no torch, no I/O. The plan is a list of pieces: each piece is
one interval of one global Megatron tensor, read from one chosen trainer rank into one place of the
receiver's staging buffer. Equal replicas (data-parallel copies, and TP copies of replicated
tensors) are striped: the pieces one replica set could serve are cut into contiguous runs of about
equal bytes, one run per replica, rotated by the engine rank, so no trainer rank carries more than
its share while each run still merges into few descriptors.

The values it returns (`Piece`, `Read`, `Plan`) live in `refit.plan.records`.

Descriptors cost time (`refit.plan.cost`): a hole between two pieces of one source is read along
when that is cheaper than a descriptor, and a strided slice (one descriptor per block) is read as
its enclosing contiguous block and cut locally when that is cheaper, within a staging budget.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from refit.errors import ConfigError, LayoutError, ModelMismatchError
from refit.plan import layered
from refit.plan import window as window_
from refit.plan.cost import DEFAULT_COST, LinkCost, enclose
from refit.plan.placement import Choice, Holder, Need, geometry
from refit.plan.records import Chunk, DirectRead, Piece, Plan, Read
from refit.plan.targets import EngineLayout, Target, merge_intervals, targets_for
from refit.types import ModelMeta, SourceRecord, TensorDesc

# Staging an enclosing block holds bytes the engine does not need; together they may add at most this
# fraction of the bytes it does need (staging already holds a whole copy of the rank's tensors).
MAX_OVERREAD = 0.25


def stripe(*, replica: int, tp_rank: int, tp_size: int) -> int:
    """The stripe (replica rotation) of one engine rank: engine replicas, then TP ranks within each.

    Every engine rank of the fleet gets a different stripe, so equal trainer replicas share the
    load evenly; the receiver and the cluster benchmark both use this one rule.
    """
    return replica * tp_size + tp_rank


def _segments(desc: TensorDesc) -> list[tuple[int, int, int]]:
    """(global start, global stop, local start) runs of a shard along its partition dim."""
    d, s = desc.partition_dim, desc.partition_stride
    if s == 1:
        return [(desc.offset, desc.offset + desc.local_shape[d], 0)]
    part_local = desc.local_shape[d] // s
    part_global = desc.global_shape[d] // s
    return [
        (k * part_global + desc.offset, k * part_global + desc.offset + part_local, k * part_local) for k in range(s)
    ]


def _needs(
    tensor: str, dim: int | None, intervals: Sequence[tuple[int, int]], shards: Sequence[tuple[int, TensorDesc]]
) -> list[Need]:
    if dim is None:
        holders = tuple(Holder(rank=r, desc=d, local=0) for r, d in shards)
        return [Need(tensor=tensor, dim=None, start=0, stop=0, holders=holders)]
    # 1. Cut each interval by every shard run that overlaps it.
    cuts: dict[tuple[int, int], list[Holder]] = defaultdict(list)
    for rank, desc in shards:
        if desc.partition_dim == -1:
            segs = [(0, desc.global_shape[dim], 0)]
        elif desc.partition_dim == dim:
            segs = _segments(desc)
        else:
            raise LayoutError(f"{tensor}: shards split on dim {desc.partition_dim}, target needs dim {dim}")
        for g0, g1, l0 in segs:
            for a, b in intervals:
                lo, hi = max(a, g0), min(b, g1)
                if lo < hi:
                    cuts[(lo, hi)].append(Holder(rank=rank, desc=desc, local=l0 + lo - g0))
    # 2. The common case: every shard that touches an interval covers all of it; nothing to cut.
    if len(cuts) == len(intervals) and all(iv in cuts for iv in intervals):
        return [Need(tensor=tensor, dim=dim, start=a, stop=b, holders=tuple(cuts[(a, b)])) for a, b in intervals]
    # 3. Shards of different ranks can cut an interval at different points; split at every cut.
    bounds = sorted({x for ab in cuts for x in ab} | {x for ab in intervals for x in ab})
    needs = []
    for a, b in intervals:
        points = [p for p in bounds if a <= p <= b]
        for lo, hi in itertools.pairwise(points):
            holders = [
                Holder(rank=h.rank, desc=h.desc, local=h.local + lo - c0)
                for (c0, c1), hs in cuts.items()
                if c0 <= lo and hi <= c1
                for h in hs
            ]
            if not holders:
                raise LayoutError(f"no trainer rank publishes rows [{lo}, {hi}) of {tensor}")
            needs.append(Need(tensor=tensor, dim=dim, start=lo, stop=hi, holders=tuple(holders)))
    return needs


def _choose(needs: Iterable[Need], stripe: int) -> list[Choice]:
    """Give each need one holder, striping runs of pieces over equal replicas."""
    # 1. Group the needs by the set of ranks that hold them (one replica set per group).
    groups: dict[tuple[int, ...], list[Need]] = defaultdict(list)
    for need in needs:
        holders = need.holders
        key = (holders[0].rank,) if len(holders) == 1 else tuple(sorted({h.rank for h in holders}))
        groups[key].append(need)
    chosen: list[Choice] = []
    for ranks, group in groups.items():
        if len(ranks) == 1:  # a single holder (an expert without copies, say): nothing to stripe
            chosen.extend(Choice(need=need, holder=need.holder(ranks[0])) for need in group)
            continue
        # 2. Order the group by where the first replica holds each need, so runs are contiguous there
        #    (and, replicas being laid out alike, on every other replica too).
        keyed = []
        for need in group:
            holder = need.holder(ranks[0])
            geo = geometry(need, holder)
            keyed.append(((holder.desc.region, geo.remote_offset), geo.nbytes, need))
        keyed.sort(key=lambda k: k[0])
        # 3. Cut the ordered group into one run of about `share` bytes per replica, and give run i
        #    to replica (i + stripe) so different engine ranks start on different replicas.
        share, acc = sum(k[1] for k in keyed) / len(ranks), 0
        for _, size, need in keyed:
            run = min(int(acc // share), len(ranks) - 1) if share else 0
            acc += size
            rank = ranks[(run + stripe) % len(ranks)]
            chosen.append(Choice(need=need, holder=need.holder(rank)))
    return chosen


def plan_refit(
    *,
    model: ModelMeta,
    sources: Sequence[SourceRecord],
    layout: EngineLayout,
    stripe: int | None = None,
    only: Iterable[str] | None = None,
    cost: LinkCost = DEFAULT_COST,
    max_gap: int | None = None,
    max_overread: float = MAX_OVERREAD,
    window: int | None = None,
    direct: Callable[[Target], bool] | None = None,
    direct_min_bytes: int = 0,
    layer_of: Callable[[Target], tuple[int, str]] | None = None,
    direct_min_whole: int | None = None,
) -> Plan:
    """Plan one engine rank's pull of every tensor it needs (or of the HF names in `only`).

    `stripe` rotates which replica serves which run (default: the engine TP rank). `cost` prices
    bytes and descriptors on the engine's link: a hole between two pieces of a source is read along
    when that is cheaper than a descriptor (or, given `max_gap`, when it is at most that many bytes),
    and a strided slice is read as its enclosing block when that is cheaper, the enclosing blocks'
    unneeded bytes staying within `max_overread` times the bytes the engine needs (0: never).

    `direct` (given an engine target, whether the engine can take a read straight into its memory)
    lets every piece that lands as contiguous runs on both sides skip staging (runs of at least
    `direct_min_bytes`, or of `direct_min_whole` for a piece that is one run of one engine tensor,
    where given; `refit.plan.window.direct_reads`). The rest
    is staged: in one chunk when it fits `window` bytes (or no window is given), else in chunks of
    at most half the window each (`refit.plan.window`). With `layer_of` (a target's engine layer as
    (order, name)) those chunks hold whole layers (`refit.plan.layered`), for engines that install
    layer by layer; a layer larger than half the window is then a ConfigError naming it.

    Raises ModelMismatchError when the engine layout cannot hold the model, and LayoutError when
    the published shards do not cover what the engine needs.
    """
    # 1. Every published shard of every global tensor, with the trainer rank that holds it.
    shards: dict[str, list[tuple[int, TensorDesc]]] = defaultdict(list)
    for src in sources:
        for desc in src.tensors:
            shards[desc.name].append((src.rank, desc))
    if not shards:
        raise LayoutError("the version has no tensors")
    # 2. The engine tensors they yield for this engine rank (or only the ones asked for).
    targets: list[Target] = []
    for name in sorted(shards):
        targets.extend(targets_for(model, shards[name][0][1], layout))
    if only is not None:
        wanted = set(only)
        unknown = wanted - {t.hf_name for t in targets}
        if unknown:
            raise ModelMismatchError(f"the catalog publishes no tensor for {sorted(unknown)}")
        targets = [t for t in targets if t.hf_name in wanted]
    # 3. Per global tensor, the union of the rows its targets need, cut where the shards are cut.
    by_tensor: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        by_tensor[t.source].append(t)
    needs: list[Need] = []
    for name, ts in by_tensor.items():
        dims = {t.dim for t in ts}
        if len(dims) != 1:
            raise LayoutError(f"{name}: targets disagree on the split dimension")
        dim = dims.pop()
        intervals = merge_intervals(iv for t in ts for iv in t.rows)
        needs.extend(_needs(name, dim, intervals, shards[name]))
    # 4. One holder per need (striped over replicas), which strided slices to read whole, then the
    #    staging layout and the reads.
    if max_overread < 0 or (max_gap is not None and max_gap < 0):
        raise ConfigError(f"max_overread ({max_overread}) and max_gap ({max_gap}) must be >= 0")
    rotation = layout.tp_rank if stripe is None else stripe
    located = [(c, geometry(c.need, c.holder)) for c in _choose(needs, rotation)]
    strided = [
        (i, geo.block_bytes, geo.count, geo.remote_stride) for i, (_, geo) in enumerate(located) if geo.count > 1
    ]
    budget = max_overread * sum(geo.nbytes for _, geo in located)
    enclosed = enclose(strided, cost=cost, budget=budget, seed=rotation)
    bridges = cost.bridges if max_gap is None else (lambda gap: gap <= max_gap)
    # 5. Tensors read straight into the engine, then the staged rest in chunks that fit the window.
    if window is not None and window <= 0:
        raise ConfigError(f"window must be positive, got {window}")
    chosen, direct_list = (
        window_.direct_reads(located, enclosed, targets, direct, direct_min_bytes, direct_min_whole)
        if direct
        else (set(), [])
    )
    keep = [i for i in range(len(located)) if i not in chosen]
    renumber = {i: k for k, i in enumerate(keep)}
    staged = [located[i] for i in keep]
    staged_enclosed = {renumber[i] for i in enclosed if i in renumber}
    parts = window_.layout(staged, staged_enclosed, bridges, window if layer_of is None else None)
    slots = window_.SLOTS
    if layer_of is not None and window is not None and parts[0].staging_bytes > window:
        slots = layered.SLOTS
        limit = max(window // slots, 1)
        parts = layered.layer_chunks(staged, staged_enclosed, bridges, targets, layer_of, limit, window)
    by_rank: dict[int, int] = defaultdict(int)
    for c in parts:
        for p in c.pieces:
            by_rank[p.rank] += p.nbytes
    for d in direct_list:
        by_rank[d.rank] += d.nbytes
    return Plan(
        targets=tuple(targets),
        pieces=tuple(p for c in parts for p in c.pieces),
        reads=tuple(r for c in parts for r in c.reads),
        staging_bytes=window_.peak_staging(parts, slots),
        bytes_by_rank=dict(by_rank),
        cost=cost,
        chunks=parts,
        direct=tuple(direct_list),
        slots=slots,
    )


__all__ = ["MAX_OVERREAD", "Chunk", "DirectRead", "Piece", "Plan", "Read", "plan_refit", "stripe"]
