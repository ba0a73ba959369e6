"""Block digests of published bytes: what a trainer rank computes on its shards, and a receiver on
what it pulled, with the same function on the device where the bytes are.

**Blocks.** A shard is cut into blocks along the axis receivers cut it: columns for a tensor split on
an inner dim (`partition_dim >= 1`: row-parallel weights, expert fc2), rows (dim 0) for every other
tensor. A block is `digest_block` units (rows or columns) of the shard, every outer row included
(column blocks are `outer x digest_block` sub-matrices). The publisher picks the largest power of two
dividing the unit count by up to `MAX_SPLIT` times the partition stride, with a block no larger than
`BLOCK_BYTES`, so the row ranges, per-query-group QKV rows, gate/up halves and column slices of an
engine at up to `MAX_SPLIT` times the trainer's TP fall on block boundaries, and every block an
engine reads is read whole. A replicated tensor up to `BLOCK_BYTES` is one block.

**The digest of a block.** Its bytes, in row-major order of the block, are viewed as integer words
(`int64` where the geometry allows, else narrower words widened to int64), grouped in lines of up to
`LINE_WORDS` words; `D = sum over lines m of (2m + 1) * (sum of the line's words)`, all mod 2**64.
Only integer adds and multiplies, exact modulo 2**64: the value does not depend on the order of the
reduction, so CPU and CUDA agree bit for bit. Any single changed word changes `D` (its weight is
odd); so does moving data between lines; swapping words within one line (up to 16 KiB) does not. Not a
cryptographic hash: it catches corruption and stale or misplaced bytes, not an adversary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from refit.dtypes import DTYPE_SIZES
from refit.errors import LayoutError
from refit.types import DigestSet, TensorDesc

ALGORITHM = "refit-linesum64-v1"
BLOCK_BYTES = 4 << 20  # the largest block the publisher chooses
MAX_SPLIT = 8  # blocks stay aligned for engine TP up to this many times the trainer's TP
LINE_WORDS = 2048  # words per line (16 KiB of int64 words; long lines keep the sums on the vectorised path)
WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@dataclass(frozen=True, kw_only=True, slots=True)
class Geometry:
    """A shard as blocks: `outer` rows of `row_bytes`, each block `block_bytes` of every row.

    Rows-axis tensors have `outer == 1` (a block is contiguous); column blocks span every outer row.
    `unit_bytes` is one unit (row or column) of one outer row; words are `word` bytes.
    """

    columns: bool
    outer: int
    units: int
    unit_bytes: int
    block_units: int
    word: int

    @property
    def row_bytes(self) -> int:
        return self.units * self.unit_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one outer row."""
        return self.block_units * self.unit_bytes

    @property
    def blocks(self) -> int:
        return self.units // self.block_units if self.block_units else 0


def _axes(shape: Sequence[int], partition_dim: int, item: int) -> tuple[bool, int, int, int]:
    """(columns, outer, units, unit bytes) of a shard of `shape`."""
    if partition_dim >= 1:
        d = partition_dim
        return True, math.prod(shape[:d]), shape[d], math.prod(shape[d + 1 :]) * item
    units = shape[0] if shape else 1
    return False, 1, units, (math.prod(shape[1:]) if shape else 1) * item


def choose_block(desc: TensorDesc) -> int:
    """The publisher's block size (units) for `desc`; 0 for an empty shard."""
    _, outer, units, unit_bytes = _axes(desc.local_shape, desc.partition_dim, desc.itemsize)
    if desc.nbytes == 0:
        return 0
    if desc.partition_dim == -1 and desc.nbytes <= BLOCK_BYTES:
        return units
    stride = desc.partition_stride
    base = units
    for split in (MAX_SPLIT * stride, MAX_SPLIT, stride, 1):
        if units % split == 0:
            base = units // split
            break
    block = base & -base  # the largest power of two dividing it
    while block > 1 and block * unit_bytes * outer > BLOCK_BYTES:
        block //= 2
    return block


def geometry(desc: TensorDesc) -> Geometry | None:
    """The block geometry `desc` was published with (None: no digests); LayoutError if it cannot be."""
    if desc.digest_block == 0:
        return None
    item = DTYPE_SIZES[desc.dtype]
    columns, outer, units, unit_bytes = _axes(desc.local_shape, desc.partition_dim, item)
    if units % desc.digest_block:
        raise LayoutError(f"{desc.name}: digest_block {desc.digest_block} does not divide {units} units")
    block_bytes = desc.digest_block * unit_bytes
    row = units * unit_bytes if outer > 1 else block_bytes
    word = next(w for w in (8, 4, 2, 1) if block_bytes % w == 0 and row % w == 0)
    return Geometry(
        columns=columns, outer=outer, units=units, unit_bytes=unit_bytes, block_units=desc.digest_block, word=word
    )


def with_blocks(desc: TensorDesc) -> TensorDesc:
    """`desc` with the publisher's block size set."""
    from dataclasses import replace

    return replace(desc, digest_block=choose_block(desc))


def block_digests(buf: torch.Tensor, start: int, geo: Geometry, count: int, row_stride: int) -> torch.Tensor:
    """Digests (int64, on `buf`'s device) of `count` consecutive blocks whose first byte (of outer row 0)
    is `buf[start]`; outer rows lie `row_stride` bytes apart in `buf` (a flat uint8 tensor)."""
    width = count * geo.block_bytes
    rows = geo.outer
    if rows == 1:
        row_stride = width
    span = (rows - 1) * row_stride + width
    ws = geo.word
    if (buf.data_ptr() + start) % ws or row_stride % ws:
        # Misaligned for the word view: an aligned copy of the blocks' bytes (rare; staging is item-aligned).
        view = buf.as_strided((rows, width), (row_stride, 1), buf.storage_offset() + start)
        packed = view.clone(memory_format=torch.contiguous_format)
        seg, row_stride = packed.view(-1), width
    else:
        seg = buf[start : start + span]
    q = geo.block_bytes // ws
    words = seg.view(WORDS[ws]).as_strided((rows, count, q), (row_stride // ws, q, 1))
    if ws < 8:
        words = words.to(torch.int64)
    lane = math.gcd(q, LINE_WORDS)
    lines = q // lane
    if lines == 1 and rows > 1 and words.device.type == "cpu":
        # Each block row is one line: weight the rows in one int64 matrix-vector product (short
        # inner sums are slow on CPU; torch has no integer matmul on CUDA, where the sums are fast).
        weights = torch.arange(rows, dtype=torch.int64) * 2 + 1
        return torch.mv(words.reshape(rows, count * q).t(), weights).view(count, q).sum(-1)
    sums = words.reshape(rows, count, lines, lane).sum(-1)  # int64 adds wrap modulo 2**64
    return (sums * _line_weights(rows, lines, buf.device)).sum((0, 2))


def _line_weights(rows: int, lines: int, device: torch.device) -> torch.Tensor:
    """The odd weights 2m + 1 of the lines, shaped (rows, 1, lines); made once per shape and device
    (a receiver checks the same block shapes every refit), except inside a CUDA graph capture
    (`refit.plan.digest_batch`), where ops are recorded, not run: weights made and cached there would
    hold nothing until the graph replays, so the graph makes its own on each replay."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _make_line_weights(rows, lines, device)
    return _cached_line_weights(rows, lines, device)


def _make_line_weights(rows: int, lines: int, device: torch.device) -> torch.Tensor:
    return torch.arange(rows * lines, dtype=torch.int64, device=device).view(rows, 1, lines) * 2 + 1


_cached_line_weights = functools.lru_cache(maxsize=256)(_make_line_weights)


def shard_digests(region: torch.Tensor, desc: TensorDesc) -> torch.Tensor | None:
    """Every block digest of `desc`, whose bytes lie in `region` (a flat uint8 tensor) at its byte offset."""
    geo = geometry(desc)
    if geo is None or geo.blocks == 0:
        return None
    return block_digests(region, desc.byte_offset, geo, geo.blocks, geo.row_bytes)


def pack(digests: Sequence[torch.Tensor | None]) -> DigestSet:
    """The `DigestSet` of a record's tensors (one host copy for all of them)."""
    present = [d for d in digests if d is not None]
    if not present:
        return DigestSet()
    values = torch.cat([d.reshape(-1) for d in present]).cpu().numpy().astype("<i8", copy=False)
    return DigestSet(algorithm=ALGORITHM, values=values.tobytes())


def unpack(digests: DigestSet) -> np.ndarray:
    """The int64 values of a `DigestSet` (empty when it has none)."""
    return np.frombuffer(digests.values, dtype="<i8")


def count(tensors: Sequence[TensorDesc]) -> int:
    """Block digests a record of `tensors` carries."""
    total = 0
    for t in tensors:
        geo = geometry(t)
        total += geo.blocks if geo is not None else 0
    return total
