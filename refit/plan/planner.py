"""Plan a refit: which byte ranges an engine rank pulls from which trainer rank, and where they land.

Pure logic over catalog descriptors; no torch, no I/O. The plan is a list of pieces: each piece is
one interval of one global Megatron tensor, read from one chosen trainer rank into one place of the
receiver's staging buffer. Equal replicas (data-parallel copies, and TP copies of replicated
tensors) are striped: the pieces one replica set could serve are cut into contiguous runs of about
equal bytes, one run per replica, rotated by the engine rank, so no trainer rank carries more than
its share while each run still merges into few descriptors.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from refit.dtypes import DTYPE_SIZES
from refit.errors import LayoutError, ModelMismatchError
from refit.plan.targets import EngineLayout, Target, merge_intervals, targets_for
from refit.types import ModelMeta, SourceRecord, TensorDesc

# Holes up to this size between two pieces of one source are read along rather than splitting the read.
MAX_GAP = 64 * 1024


def stripe(*, replica: int, tp_rank: int, tp_size: int) -> int:
    """The stripe (replica rotation) of one engine rank: engine replicas, then TP ranks within each.

    Every engine rank of the fleet gets a different stripe, so equal trainer replicas share the
    load evenly; the receiver and the cluster benchmark both use this one rule.
    """
    return replica * tp_size + tp_rank


@dataclass(frozen=True, kw_only=True, slots=True)
class Piece:
    """One interval of one Megatron tensor, read from trainer rank `rank` into staging.

    The read is `count` blocks of `block_bytes`; block i sits at `remote_offset + i*remote_stride`
    in the trainer's region and lands at `local_offset + i*block_bytes` in staging, so the staged
    piece is a dense tensor of `shape`.
    """

    tensor: str
    rank: int
    dim: int | None
    start: int
    stop: int
    shape: tuple[int, ...]
    dtype: str
    region: int
    remote_offset: int
    block_bytes: int
    count: int
    remote_stride: int
    local_offset: int = 0

    @property
    def nbytes(self) -> int:
        return self.block_bytes * self.count


@dataclass(frozen=True, kw_only=True, slots=True)
class Read:
    """One transfer descriptor (or `count` strided ones): what the transport actually moves."""

    rank: int
    region: int
    remote_offset: int
    local_offset: int
    block_bytes: int
    count: int = 1
    remote_stride: int = 0

    @property
    def nbytes(self) -> int:
        return self.block_bytes * self.count


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """Everything one engine rank does for one refit, before any byte moves."""

    targets: tuple[Target, ...]
    pieces: tuple[Piece, ...]
    reads: tuple[Read, ...]
    staging_bytes: int
    bytes_by_rank: dict[int, int]  # useful bytes per trainer rank

    @property
    def total_bytes(self) -> int:
        """Bytes the engine needs (holes read along to merge reads are not counted)."""
        return sum(self.bytes_by_rank.values())

    @property
    def wire_bytes(self) -> int:
        """Bytes actually moved, holes included."""
        return sum(r.nbytes for r in self.reads)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Need:
    tensor: str
    dim: int | None
    start: int
    stop: int
    # (rank, descriptor, first local index along dim) of every replica that holds this interval
    holders: tuple[tuple[int, TensorDesc, int], ...]


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
        return [_Need(tensor=tensor, dim=None, start=0, stop=0, holders=tuple((r, d, 0) for r, d in shards))]
    cuts: dict[tuple[int, int], list[tuple[int, TensorDesc, int]]] = defaultdict(list)
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
                    cuts[(lo, hi)].append((rank, desc, l0 + lo - g0))
    if len(cuts) == len(intervals) and all(iv in cuts for iv in intervals):
        # The common case: every shard that touches an interval covers all of it; nothing to cut.
        return [_Need(tensor=tensor, dim=dim, start=a, stop=b, holders=tuple(cuts[(a, b)])) for a, b in intervals]
    # Shards of different ranks can cut an interval at different points; split at every cut.
    bounds = sorted({x for ab in cuts for x in ab} | {x for ab in intervals for x in ab})
    needs = []
    for a, b in intervals:
        points = [p for p in bounds if a <= p <= b]
        for lo, hi in itertools.pairwise(points):
            holders = [
                (rank, desc, l0 + lo - c0)
                for (c0, c1), hs in cuts.items()
                if c0 <= lo and hi <= c1
                for rank, desc, l0 in hs
            ]
            if not holders:
                raise LayoutError(f"no trainer rank publishes rows [{lo}, {hi}) of {tensor}")
            needs.append(_Need(tensor=tensor, dim=dim, start=lo, stop=hi, holders=tuple(holders)))
    return needs


# A need with its chosen holder: (need, rank, descriptor, first local index along the need's dim).
_Choice = tuple[_Need, int, TensorDesc, int]


def _geometry(need: _Need, desc: TensorDesc, local_start: int) -> tuple[tuple[int, ...], int, int, int, int]:
    """(shape, remote_offset, block_bytes, count, remote_stride) of `need` read from shard `desc`."""
    if need.dim is None:
        return desc.local_shape, desc.byte_offset, desc.nbytes, 1, 0
    item = DTYPE_SIZES[desc.dtype]
    dim, width, local_shape = need.dim, need.stop - need.start, desc.local_shape
    outer = math.prod(local_shape[:dim])
    inner = math.prod(local_shape[dim + 1 :])
    local_width = local_shape[dim]
    shape = (*local_shape[:dim], width, *local_shape[dim + 1 :])
    start = desc.byte_offset + local_start * inner * item
    if outer == 1 or width == local_width:
        return shape, start, outer * width * inner * item, 1, 0
    return shape, start, width * inner * item, outer, local_width * inner * item


def _holder(need: _Need, rank: int) -> tuple[TensorDesc, int]:
    for r, desc, local in need.holders:
        if r == rank:
            return desc, local
    raise AssertionError(f"rank {rank} does not hold {need.tensor}")


def _choose(needs: Iterable[_Need], stripe: int) -> list[_Choice]:
    """Give each need one holder, striping runs of pieces over equal replicas."""
    groups: dict[tuple[int, ...], list[_Need]] = defaultdict(list)
    for need in needs:
        holders = need.holders
        key = (holders[0][0],) if len(holders) == 1 else tuple(sorted({h[0] for h in holders}))
        groups[key].append(need)
    chosen: list[_Choice] = []
    for ranks, group in groups.items():
        if len(ranks) == 1:  # a single holder (an expert without copies, say): nothing to stripe
            chosen.extend((need, ranks[0], *_holder(need, ranks[0])) for need in group)
            continue
        first = ranks[0]
        keyed = []
        for need in group:
            desc, local = _holder(need, first)
            _, offset, block, count, _ = _geometry(need, desc, local)
            keyed.append(((desc.region, offset), block * count, need))
        keyed.sort(key=lambda k: k[0])
        share, acc = sum(k[1] for k in keyed) / len(ranks), 0
        for _, size, need in keyed:
            # Run index by cumulative bytes: contiguous runs of about `share` bytes per replica.
            run = min(int(acc // share), len(ranks) - 1) if share else 0
            acc += size
            rank = ranks[(run + stripe) % len(ranks)]
            chosen.append((need, rank, *_holder(need, rank)))
    return chosen


def _place(chosen: list[_Choice], max_gap: int) -> tuple[list[Piece], list[Read], int]:
    """Lay the chosen pieces out in staging and group them into reads.

    Pieces are laid out per source in remote-address order. Small holes between consecutive
    contiguous pieces of one source (a norm another replica serves, say) are mirrored in staging and
    read along, so a source's pieces become a few large reads instead of one per tensor.
    """
    geo = []
    for need, rank, desc, local in chosen:
        shape, remote, block, count, stride = _geometry(need, desc, local)
        geo.append((rank, desc.region, remote, need, desc, shape, block, count, stride))
    geo.sort(key=lambda g: g[:3])
    offset, placed, reads = 0, [], []
    current: list[int] | None = None  # [rank, region, remote_start, local_start, nbytes] of an open read
    for rank, region, remote, need, desc, shape, block, count, stride in geo:
        item, nbytes = DTYPE_SIZES[desc.dtype], block * count
        local = -1
        if current is not None and count == 1 and current[0] == rank and current[1] == region:
            gap = remote - (current[2] + current[4])
            local = current[3] + current[4] + gap
            if not (0 <= gap <= max_gap and local % item == 0):
                local = -1
        if local >= 0:
            assert current is not None
            current[4] = local - current[3] + nbytes
        else:
            if current is not None:
                reads.append(Read(rank=current[0], region=current[1], remote_offset=current[2],
                                  local_offset=current[3], block_bytes=current[4]))  # fmt: skip
                current = None
            local = -(-offset // item) * item
        placed.append(
            Piece(
                tensor=need.tensor,
                rank=rank,
                dim=need.dim,
                start=need.start,
                stop=need.stop,
                shape=shape,
                dtype=desc.dtype,
                region=region,
                remote_offset=remote,
                block_bytes=block,
                count=count,
                remote_stride=stride,
                local_offset=local,
            )
        )
        offset = local + nbytes
        if current is not None:  # the piece extended the open read
            continue
        if count == 1:
            current = [rank, region, remote, local, nbytes]
        else:
            reads.append(Read(rank=rank, region=region, remote_offset=remote, local_offset=local,
                              block_bytes=block, count=count, remote_stride=stride))  # fmt: skip
    if current is not None:
        reads.append(Read(rank=current[0], region=current[1], remote_offset=current[2],
                          local_offset=current[3], block_bytes=current[4]))  # fmt: skip
    return placed, reads, offset


def plan_refit(
    *,
    model: ModelMeta,
    sources: Sequence[SourceRecord],
    layout: EngineLayout,
    stripe: int | None = None,
    only: Iterable[str] | None = None,
    max_gap: int = MAX_GAP,
) -> Plan:
    """Plan one engine rank's pull of every tensor it needs (or of the HF names in `only`).

    `stripe` rotates which replica serves which run (default: the engine TP rank); holes of up
    to `max_gap` bytes between a source's pieces are read along to keep reads few.

    Raises ModelMismatchError when the engine layout cannot hold the model, and LayoutError when
    the published shards do not cover what the engine needs.
    """
    shards: dict[str, list[tuple[int, TensorDesc]]] = defaultdict(list)
    for src in sources:
        for desc in src.tensors:
            shards[desc.name].append((src.rank, desc))
    if not shards:
        raise LayoutError("the version has no tensors")
    targets: list[Target] = []
    for name in sorted(shards):
        targets.extend(targets_for(model, shards[name][0][1], layout))
    if only is not None:
        wanted = set(only)
        unknown = wanted - {t.hf_name for t in targets}
        if unknown:
            raise ModelMismatchError(f"the catalog publishes no tensor for {sorted(unknown)}")
        targets = [t for t in targets if t.hf_name in wanted]
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
    pieces, reads, staging = _place(_choose(needs, layout.tp_rank if stripe is None else stripe), max_gap)
    by_rank: dict[int, int] = defaultdict(int)
    for p in pieces:
        by_rank[p.rank] += p.nbytes
    return Plan(
        targets=tuple(targets),
        pieces=tuple(pieces),
        reads=tuple(reads),
        staging_bytes=staging,
        bytes_by_rank=dict(by_rank),
    )
