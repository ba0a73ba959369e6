"""Row-parallel tensors published as contiguous column blocks (`Publisher(row_blocks=k)`).

A tensor split along an inner dimension `d` (row-parallel weights, attention `linear_proj`, MoE
expert `linear_fc2`: `d = 1`) stores a slice of its columns as `prod(shape[:d])` strided runs. An
engine at a higher TP than the trainer needs such a slice of every one of them, which is one
transfer descriptor per run: DeepSeek-V3's expert `linear_fc2` at engine TP32 is 7,168 runs of 128
bytes per expert. Stored instead as `k` column blocks back to back (block `j` holds columns
`[j*W/k, (j+1)*W/k)` of the `W` columns of the shard, as a dense tensor), a slice of whole blocks
is contiguous, and the planner reads the consecutive blocks an engine rank needs as one descriptor.

Each block is published as an ordinary `TensorDesc` of the same global tensor (a shard with
`W/k` columns at offset `shard offset + j*W/k`), so the planner, the receiver and every engine need
nothing new: a tensor published in several shards by one rank is planned like shards of several
ranks, and adjacent contiguous pieces of one source merge into one read.

Eligible: shards split on dim `d >= 1` with partition stride 1 and more than one run
(`prod(local_shape[:d]) > 1`). When `k` does not divide `W`, the largest divisor of `W` below `k`
is used (1: the tensor is published as it is). This module holds the descriptor transform (used by
the publisher and by `refit-bench plan`'s synthetic trainers) and the tensor views a copy writes the
blocked layout through; it needs no torch import of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from refit.errors import ConfigError
from refit.types import TensorDesc

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, kw_only=True, slots=True)
class ColumnBlocks:
    """A tensor stored as `count` blocks of its dimension `dim`, each a dense tensor, back to back."""

    dim: int
    count: int

    def __post_init__(self) -> None:
        if self.dim < 1 or self.count < 2:
            raise ConfigError(f"column blocks need dim >= 1 and count >= 2, got dim {self.dim}, count {self.count}")


def check_requested(row_blocks: object) -> int:
    """`row_blocks` as given to the publisher: an int >= 1 (1: publish every tensor as it is)."""
    if isinstance(row_blocks, bool) or not isinstance(row_blocks, int) or row_blocks < 1:
        raise ConfigError(f"row_blocks must be an int >= 1, got {row_blocks!r}")
    return row_blocks


def block_count(*, shape: tuple[int, ...], partition_dim: int, partition_stride: int, requested: int) -> int:
    """How many column blocks a shard of `shape` is stored as for `requested` (1: not blocked).

    Not blocked: shards not split on an inner dim, split with a stride (their parts are already
    interleaved), or with a single run (nothing is strided). Otherwise the largest divisor of the
    shard's width that is at most `requested`.
    """
    check_requested(requested)
    if partition_dim < 1 or partition_stride != 1 or math.prod(shape[:partition_dim]) <= 1:
        return 1
    width = shape[partition_dim]
    return max(n for n in range(1, min(requested, width) + 1) if width % n == 0)


def layout_for(
    *, shape: tuple[int, ...], partition_dim: int, partition_stride: int, requested: int
) -> ColumnBlocks | None:
    """The blocked layout of a shard for `requested` blocks, or None when it is stored as it is."""
    n = block_count(shape=shape, partition_dim=partition_dim, partition_stride=partition_stride, requested=requested)
    return ColumnBlocks(dim=partition_dim, count=n) if n > 1 else None


def split(desc: TensorDesc, count: int) -> tuple[TensorDesc, ...]:
    """The descriptors of the `count` blocks of `desc`, whose bytes at `desc.byte_offset` are stored blocked.

    Block `j` is a shard of the same global tensor: columns `[offset + j*W/count, ...)` of it, `1/count`
    of the bytes, starting `j * desc.nbytes / count` bytes after `desc.byte_offset`.
    """
    if count == 1:
        return (desc,)
    d = desc.partition_dim
    if d < 1 or desc.partition_stride != 1 or count < 1 or desc.local_shape[d] % count:
        raise ConfigError(f"{desc.name}: cannot store {count} column blocks of a shard split on dim {d} "
                          f"(stride {desc.partition_stride}, shape {desc.local_shape})")  # fmt: skip
    width = desc.local_shape[d] // count
    shape = (*desc.local_shape[:d], width, *desc.local_shape[d + 1 :])
    step = desc.nbytes // count
    return tuple(
        replace(desc, local_shape=shape, offset=desc.offset + j * width, byte_offset=desc.byte_offset + j * step)
        for j in range(count)
    )


def blocked_descs(descs: tuple[TensorDesc, ...] | list[TensorDesc], requested: int) -> tuple[TensorDesc, ...]:
    """Every descriptor of a rank's packing with the eligible ones blocked in place (their bytes stay put).

    A blocked tensor takes exactly the bytes it took before, so a synthetic rank (`refit-bench plan`)
    keeps its packing and only its descriptors change.
    """
    out: list[TensorDesc] = []
    for desc in descs:
        n = block_count(shape=desc.local_shape, partition_dim=desc.partition_dim,
                        partition_stride=desc.partition_stride, requested=requested)  # fmt: skip
        out.extend(split(desc, n))
    return tuple(out)


def blocked_view(dest: torch.Tensor, layout: ColumnBlocks) -> torch.Tensor:
    """`dest` (contiguous, shaped like the source tensor) seen as `shape[:d] + (count, W/count) + shape[d+1:]`.

    Index `[..., j, c, ...]` of the view is column `j*W/count + c` of the source, stored in block `j`:
    `blocked_view(dest, layout).copy_(source_view(src, layout))` writes `src` blocked into `dest`.
    """
    shape, d, n = tuple(dest.shape), layout.dim, layout.count
    if not dest.is_contiguous() or shape[d] % n:
        raise ConfigError(f"cannot write {n} column blocks of dim {d} into a tensor of shape {shape}")
    return dest.view(n, *shape[:d], shape[d] // n, *shape[d + 1 :]).movedim(0, d)


def source_view(src: torch.Tensor, layout: ColumnBlocks) -> torch.Tensor:
    """`src` with its dim `d` cut into `(count, W/count)`: what `blocked_view` receives."""
    return src.unflatten(layout.dim, (layout.count, src.shape[layout.dim] // layout.count))


def copy_blocked(dest: torch.Tensor, src: torch.Tensor, layout: ColumnBlocks | None) -> None:
    """Copy `src` into `dest` (same shape, contiguous): blocked when `layout` is given, else as it is."""
    if layout is None:
        dest.copy_(src)
    else:
        blocked_view(dest, layout).copy_(source_view(src, layout))
