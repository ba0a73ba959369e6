"""One pass that copies runs of bytes and sums them in cells: a checked copy reads each byte once.

A receiver that checks what it copied reads every byte twice: the copy, then the digest's cell sums
(`refit.plan.digest_batch`) over where it landed. `CopySum` does both at once. On a GPU it cuts its
runs into tiles of `TILE_WORDS` int64 words, and one Triton program loads a tile, stores it and writes
the int64 sums (wrapping modulo 2**64, as torch's) of its cells of `cell` bytes; the tile tables are
made once and the runs are copied by one launch. The sums are those `torch.sum` gives over the
destination's words, so digests made from them are bit-identical. One H200, 8 GiB in 291 runs
(`bench/scripts/copy_sum.py`): 4.16 ms with 16 KiB cells, against 4.06 ms for one plain copy of it
all and 6.86 ms for the copies and then the sums.

On the CPU (tests) the same runs are copied and summed by torch ops, run by run. Triton is imported on
first use; `usable(device)` says whether the kernel runs there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

TILE_WORDS = 2048  # int64 words a program copies (16 KiB: a digest line at most, so every cell fits a tile)
WARPS = 8  # per program (one H200: 4, 8 and 16 within 2 %, `bench/scripts/copy_sum.py --warps`)
ALIGN = 16  # bytes: a run starts at this alignment, at both ends, so that loads and stores are vectorised


@functools.cache
def usable(device: torch.device) -> bool:
    """Whether the kernel runs on `device` (a CUDA GPU), tried once on a few tiles against torch's copy
    and sums. Triton comes with torch's CUDA wheels, but building a kernel also needs a C compiler for
    its launcher and a GPU Triton supports: where any of that fails, this says so once and the caller
    copies and sums in two passes."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.info("Triton is not installed: checked copies take two passes (a copy, then the digests)")
        return False
    try:
        src = torch.arange(3 * TILE_WORDS, dtype=torch.int64, device=device).view(torch.uint8)
        dst = torch.zeros_like(src)
        sums = torch.zeros(3 * TILE_WORDS // 64, dtype=torch.int64, device=device)
        CopySum([Run(src, dst, 0)], cell=512).run(sums)
        want = src.view(torch.int64).view(-1, 64).sum(-1)
        ok = bool(torch.equal(dst, src)) and bool(torch.equal(sums, want))
    except Exception as exc:  # noqa: BLE001 - any failure to build or run it: the two passes serve
        logger.warning("the copy-and-digest kernel cannot run on %s (%s): checked copies take two passes", device, exc)
        return False
    if not ok:
        logger.warning(
            "the copy-and-digest kernel gave wrong bytes or sums on %s: checked copies take two passes", device
        )
    return ok


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_sum(srcs, dsts, outs, counts, sums, TILE: tl.constexpr, CELL: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.multiple_of(tl.load(srcs + pid), 16)
        d = tl.multiple_of(tl.load(dsts + pid), 16)
        o = tl.load(outs + pid)
        c = tl.load(counts + pid)
        offs = tl.arange(0, TILE)
        mask = offs < c
        x = tl.load(s.to(tl.pointer_type(tl.int64)) + offs, mask=mask, other=0)
        tl.store(d.to(tl.pointer_type(tl.int64)) + offs, x, mask=mask)
        if o >= 0:
            cells = tl.arange(0, TILE // CELL)
            part = tl.sum(tl.reshape(x, (TILE // CELL, CELL)), axis=1)
            tl.store(sums + o + cells, part, mask=cells * CELL < c)

    return copy_sum


@dataclass(frozen=True, slots=True)
class Run:
    """Copy `src` into `dst` (flat uint8 tensors of one size); with `first` >= 0, the sums of its cells
    go to the cell sums from index `first` on."""

    src: torch.Tensor
    dst: torch.Tensor
    first: int = -1


def fits(src: torch.Tensor, dst: torch.Tensor, cell: int, summed: bool = True) -> bool:
    """Whether a `Run` of `src` into `dst` can be copied (and, `summed`, summed in cells of `cell` bytes)."""
    n = src.numel()
    aligned = src.data_ptr() % ALIGN == 0 and dst.data_ptr() % ALIGN == 0 and n == dst.numel()
    cells = n % cell == 0 and 8 <= cell <= TILE_WORDS * 8 and cell & (cell - 1) == 0 if summed else n % 8 == 0
    return aligned and cells


class CopySum:
    """Runs whose cells are of one size, copied and summed at once (`run`), on their tensors' device."""

    def __init__(self, runs: Sequence[Run], *, cell: int) -> None:
        for r in runs:
            if not fits(r.src, r.dst, cell, r.first >= 0):
                raise ValueError(f"a run of {r.src.numel()} bytes does not fit cells of {cell} bytes")
        self.cell = cell
        self.runs = tuple(runs)
        self._tables: tuple[torch.Tensor, ...] | None = None
        if runs and runs[0].dst.is_cuda:
            self._tables = _tiles(self.runs, cell, runs[0].dst.device)

    def run(self, sums: torch.Tensor) -> None:
        """Copy every run and write its cells' sums into `sums` (int64, on the runs' device), on the
        current stream."""
        if self._tables is not None:
            tiles = self._tables[0].shape[0]
            _kernel()[(tiles,)](*self._tables, sums, TILE=TILE_WORDS, CELL=self.cell // 8, num_warps=WARPS)
            return
        for r in self.runs:
            r.dst.copy_(r.src)
            if r.first >= 0:
                n = r.src.numel() // self.cell
                torch.sum(r.src.view(torch.int64).view(n, -1), -1, out=sums[r.first : r.first + n])


def _tiles(runs: Sequence[Run], cell: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(source addresses, destination addresses, first cells or -1, words) of every tile of `runs`."""
    per_tile = TILE_WORDS * 8
    cols = []
    for r in runs:
        n = r.src.numel()
        at = np.arange(0, n, per_tile, dtype=np.int64)
        out = np.full_like(at, -1) if r.first < 0 else r.first + at // cell
        cols.append((r.src.data_ptr() + at, r.dst.data_ptr() + at, out, np.minimum(n - at, per_tile) // 8))
    return tuple(torch.from_numpy(np.concatenate([c[i] for c in cols])).to(device) for i in range(4))
