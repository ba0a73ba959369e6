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
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from refit.dtypes import DTYPE_SIZES
from refit.errors import ConfigError, LayoutError, ModelMismatchError
from refit.plan.cost import DEFAULT_COST, LinkCost, enclose
from refit.plan.records import Piece, Plan, Read
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


@dataclass(frozen=True, kw_only=True, slots=True)
class _Holder:
    """A trainer rank's shard that holds a need, and the need's first row in that shard."""

    rank: int
    desc: TensorDesc
    local: int  # first local index along the need's dim (0 for a whole tensor)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Need:
    """One interval of one global tensor the engine rank needs, and every replica that holds it."""

    tensor: str
    dim: int | None
    start: int
    stop: int
    holders: tuple[_Holder, ...]

    def holder(self, rank: int) -> _Holder:
        for h in self.holders:
            if h.rank == rank:
                return h
        raise AssertionError(f"rank {rank} does not hold {self.tensor}")


@dataclass(frozen=True, kw_only=True, slots=True)
class _Choice:
    """A need with the holder chosen to serve it."""

    need: _Need
    holder: _Holder


@dataclass(frozen=True, kw_only=True, slots=True)
class _Geometry:
    """Where a need's bytes sit in its holder's region: `count` blocks, `remote_stride` apart."""

    shape: tuple[int, ...]
    remote_offset: int
    block_bytes: int
    count: int
    remote_stride: int

    @property
    def nbytes(self) -> int:
        return self.block_bytes * self.count


@dataclass(kw_only=True, slots=True)
class _OpenRead:
    """A contiguous read still growing while `_place` lays out one source's pieces."""

    rank: int
    region: int
    remote_offset: int
    local_offset: int
    nbytes: int

    def close(self) -> Read:
        return Read(rank=self.rank, region=self.region, remote_offset=self.remote_offset,
                    local_offset=self.local_offset, block_bytes=self.nbytes)  # fmt: skip


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
) -> list[_Need]:
    if dim is None:
        holders = tuple(_Holder(rank=r, desc=d, local=0) for r, d in shards)
        return [_Need(tensor=tensor, dim=None, start=0, stop=0, holders=holders)]
    # 1. Cut each interval by every shard run that overlaps it.
    cuts: dict[tuple[int, int], list[_Holder]] = defaultdict(list)
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
                    cuts[(lo, hi)].append(_Holder(rank=rank, desc=desc, local=l0 + lo - g0))
    # 2. The common case: every shard that touches an interval covers all of it; nothing to cut.
    if len(cuts) == len(intervals) and all(iv in cuts for iv in intervals):
        return [_Need(tensor=tensor, dim=dim, start=a, stop=b, holders=tuple(cuts[(a, b)])) for a, b in intervals]
    # 3. Shards of different ranks can cut an interval at different points; split at every cut.
    bounds = sorted({x for ab in cuts for x in ab} | {x for ab in intervals for x in ab})
    needs = []
    for a, b in intervals:
        points = [p for p in bounds if a <= p <= b]
        for lo, hi in itertools.pairwise(points):
            holders = [
                _Holder(rank=h.rank, desc=h.desc, local=h.local + lo - c0)
                for (c0, c1), hs in cuts.items()
                if c0 <= lo and hi <= c1
                for h in hs
            ]
            if not holders:
                raise LayoutError(f"no trainer rank publishes rows [{lo}, {hi}) of {tensor}")
            needs.append(_Need(tensor=tensor, dim=dim, start=lo, stop=hi, holders=tuple(holders)))
    return needs


def _geometry(need: _Need, holder: _Holder) -> _Geometry:
    """Where the bytes of `need` sit in the region of `holder`."""
    desc = holder.desc
    if need.dim is None:
        return _Geometry(
            shape=desc.local_shape, remote_offset=desc.byte_offset, block_bytes=desc.nbytes, count=1, remote_stride=0
        )
    item = DTYPE_SIZES[desc.dtype]
    dim, width, local_shape = need.dim, need.stop - need.start, desc.local_shape
    outer = math.prod(local_shape[:dim])
    inner = math.prod(local_shape[dim + 1 :])
    local_width = local_shape[dim]
    shape = (*local_shape[:dim], width, *local_shape[dim + 1 :])
    start = desc.byte_offset + holder.local * inner * item
    if outer == 1 or width == local_width:  # the rows are contiguous in the shard
        return _Geometry(shape=shape, remote_offset=start, block_bytes=outer * width * inner * item, count=1,
                         remote_stride=0)  # fmt: skip
    # A slice of an inner dim: one block per outer index, a full local row apart.
    return _Geometry(shape=shape, remote_offset=start, block_bytes=width * inner * item, count=outer,
                     remote_stride=local_width * inner * item)  # fmt: skip


def _choose(needs: Iterable[_Need], stripe: int) -> list[_Choice]:
    """Give each need one holder, striping runs of pieces over equal replicas."""
    # 1. Group the needs by the set of ranks that hold them (one replica set per group).
    groups: dict[tuple[int, ...], list[_Need]] = defaultdict(list)
    for need in needs:
        holders = need.holders
        key = (holders[0].rank,) if len(holders) == 1 else tuple(sorted({h.rank for h in holders}))
        groups[key].append(need)
    chosen: list[_Choice] = []
    for ranks, group in groups.items():
        if len(ranks) == 1:  # a single holder (an expert without copies, say): nothing to stripe
            chosen.extend(_Choice(need=need, holder=need.holder(ranks[0])) for need in group)
            continue
        # 2. Order the group by where the first replica holds each need, so runs are contiguous there
        #    (and, replicas being laid out alike, on every other replica too).
        keyed = []
        for need in group:
            holder = need.holder(ranks[0])
            geo = _geometry(need, holder)
            keyed.append(((holder.desc.region, geo.remote_offset), geo.nbytes, need))
        keyed.sort(key=lambda k: k[0])
        # 3. Cut the ordered group into one run of about `share` bytes per replica, and give run i
        #    to replica (i + stripe) so different engine ranks start on different replicas.
        share, acc = sum(k[1] for k in keyed) / len(ranks), 0
        for _, size, need in keyed:
            run = min(int(acc // share), len(ranks) - 1) if share else 0
            acc += size
            rank = ranks[(run + stripe) % len(ranks)]
            chosen.append(_Choice(need=need, holder=need.holder(rank)))
    return chosen


def _span(geo: _Geometry) -> int:
    """Bytes from the first block's start to the last block's end: the enclosing block of a strided slice."""
    return (geo.count - 1) * geo.remote_stride + geo.block_bytes


def _place(
    located: Sequence[tuple[_Choice, _Geometry]], enclosed: set[int], bridges: Callable[[int], bool]
) -> tuple[list[Piece], list[Read], int]:
    """Lay the chosen pieces out in staging and group them into reads; returns the staging size too.

    Pieces are laid out per source in remote-address order. Holes between consecutive contiguous
    pieces of one source (a norm another replica serves, say) that `bridges` accepts are mirrored in
    staging and read along, so a source's pieces become a few large reads instead of one per tensor.
    A piece in `enclosed` counts as contiguous: its enclosing block is staged as it lies remotely.
    """
    # 1. Order every piece by its source address: trainer rank, region, remote offset.
    order = sorted(
        range(len(located)),
        key=lambda i: (located[i][0].holder.rank, located[i][0].holder.desc.region, located[i][1].remote_offset),
    )
    end, placed, reads = 0, [], []
    current: _OpenRead | None = None
    for i in order:
        choice, geo = located[i]
        need, rank, desc = choice.need, choice.holder.rank, choice.holder.desc
        item = DTYPE_SIZES[desc.dtype]
        whole = i in enclosed
        contiguous, span = (True, _span(geo)) if whole else (geo.count == 1, geo.nbytes)
        # 2. A contiguous piece just after the open read of the same source joins it if the hole
        #    between them is worth reading along; staging mirrors the hole, and the piece stays aligned.
        local: int | None = None
        if current is not None and contiguous and (current.rank, current.region) == (rank, desc.region):
            gap = geo.remote_offset - (current.remote_offset + current.nbytes)
            after = current.local_offset + current.nbytes + gap
            if gap >= 0 and bridges(gap) and after % item == 0:
                local = after
                current.nbytes = after + span - current.local_offset
        if local is None:
            # 3. Otherwise the open read ends, and the piece starts at the next aligned staging offset.
            if current is not None:
                reads.append(current.close())
                current = None
            local = -(-end // item) * item
        placed.append(
            Piece(
                tensor=need.tensor,
                rank=rank,
                dim=need.dim,
                start=need.start,
                stop=need.stop,
                shape=geo.shape,
                dtype=desc.dtype,
                region=desc.region,
                remote_offset=geo.remote_offset,
                block_bytes=geo.block_bytes,
                count=geo.count,
                remote_stride=geo.remote_stride,
                local_offset=local,
                local_stride=geo.remote_stride if whole else 0,
            )
        )
        end = local + span
        # 4. A piece that joined no read opens one later pieces may join, or, strided, is a read of its own.
        if current is not None:
            continue
        if contiguous:
            current = _OpenRead(rank=rank, region=desc.region, remote_offset=geo.remote_offset, local_offset=local,
                                nbytes=span)  # fmt: skip
        else:
            reads.append(Read(rank=rank, region=desc.region, remote_offset=geo.remote_offset, local_offset=local,
                              block_bytes=geo.block_bytes, count=geo.count,
                              remote_stride=geo.remote_stride))  # fmt: skip
    if current is not None:
        reads.append(current.close())
    return placed, reads, end


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
) -> Plan:
    """Plan one engine rank's pull of every tensor it needs (or of the HF names in `only`).

    `stripe` rotates which replica serves which run (default: the engine TP rank). `cost` prices
    bytes and descriptors on the engine's link: a hole between two pieces of a source is read along
    when that is cheaper than a descriptor (or, given `max_gap`, when it is at most that many bytes),
    and a strided slice is read as its enclosing block when that is cheaper, the enclosing blocks'
    unneeded bytes staying within `max_overread` times the bytes the engine needs (0: never).

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
    needs: list[_Need] = []
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
    located = [(c, _geometry(c.need, c.holder)) for c in _choose(needs, rotation)]
    strided = [
        (i, geo.block_bytes, geo.count, geo.remote_stride) for i, (_, geo) in enumerate(located) if geo.count > 1
    ]
    budget = max_overread * sum(geo.nbytes for _, geo in located)
    enclosed = enclose(strided, cost=cost, budget=budget, seed=rotation)
    bridges = cost.bridges if max_gap is None else (lambda gap: gap <= max_gap)
    pieces, reads, staging = _place(located, enclosed, bridges)
    by_rank: dict[int, int] = defaultdict(int)
    for p in pieces:
        by_rank[p.rank] += p.nbytes
    return Plan(
        targets=tuple(targets),
        pieces=tuple(pieces),
        reads=tuple(reads),
        staging_bytes=staging,
        bytes_by_rank=dict(by_rank),
        cost=cost,
    )
