"""Where a plan's bytes are and where they go: the needs and holders the planner chooses between,
the geometry of a need in its holder's region, and the staging layout with the reads that fill it.

Internal to `refit.plan`; the planner (`refit.plan.planner`) drives it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from refit.dtypes import DTYPE_SIZES
from refit.plan.records import Piece, Read
from refit.types import TensorDesc


@dataclass(frozen=True, kw_only=True, slots=True)
class Holder:
    """A trainer rank's shard that holds a need, and the need's first row in that shard."""

    rank: int
    desc: TensorDesc
    local: int  # first local index along the need's dim (0 for a whole tensor)


@dataclass(frozen=True, kw_only=True, slots=True)
class Need:
    """One interval of one global tensor the engine rank needs, and every replica that holds it."""

    tensor: str
    dim: int | None
    start: int
    stop: int
    holders: tuple[Holder, ...]

    def holder(self, rank: int) -> Holder:
        for h in self.holders:
            if h.rank == rank:
                return h
        raise AssertionError(f"rank {rank} does not hold {self.tensor}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Choice:
    """A need with the holder chosen to serve it."""

    need: Need
    holder: Holder


@dataclass(frozen=True, kw_only=True, slots=True)
class Geometry:
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
    """A contiguous read still growing while `place` lays out one source's pieces."""

    rank: int
    region: int
    remote_offset: int
    local_offset: int
    nbytes: int

    def close(self) -> Read:
        return Read(rank=self.rank, region=self.region, remote_offset=self.remote_offset,
                    local_offset=self.local_offset, block_bytes=self.nbytes)  # fmt: skip


def geometry(need: Need, holder: Holder) -> Geometry:
    """Where the bytes of `need` sit in the region of `holder`."""
    desc = holder.desc
    if need.dim is None:
        return Geometry(
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
        return Geometry(shape=shape, remote_offset=start, block_bytes=outer * width * inner * item, count=1,
                         remote_stride=0)  # fmt: skip
    # A slice of an inner dim: one block per outer index, a full local row apart.
    return Geometry(shape=shape, remote_offset=start, block_bytes=width * inner * item, count=outer,
                     remote_stride=local_width * inner * item)  # fmt: skip


def enclosing_span(geo: Geometry) -> int:
    """Bytes from the first block's start to the last block's end: the enclosing block of a strided slice."""
    return (geo.count - 1) * geo.remote_stride + geo.block_bytes


def place(
    located: Sequence[tuple[Choice, Geometry]], enclosed: set[int], bridges: Callable[[int], bool]
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
        contiguous, span = (True, enclosing_span(geo)) if whole else (geo.count == 1, geo.nbytes)
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
