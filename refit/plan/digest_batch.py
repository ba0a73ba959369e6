"""The block digests of many runs of blocks (a staging slot's, or direct reads' in engine tensors), in a
few batched ops.

`refit.digest.block_digests` issues a handful of ops per run of blocks; a staged chunk of a TP-changing
refit holds hundreds of runs (per-query-group QKV rows, gate/up halves, column slices), and issuing
them one by one on the chunk loop's thread cost more than the digests' HBM traffic. `BlockBatch` is
made once per chunk layout and computes every run's digests with O(regions + block shapes) ops:

1. **Cells.** Each region of a buffer (its runs of one word size, from the first run's start to the
   last one's end) is summed in cells of `G` bytes (int64 sums of the cell's words, wrapping modulo
   2**64), one reduction that reads each byte once, into one tensor of cell sums. `G` is a power of
   two dividing every line (`LINE_WORDS` words of a block row, or the whole block row), every run's
   start and outer-row stride, so each line is whole cells; coarser cells (for runs whose lines and
   offsets allow them) are sums of the finest ones. Runs whose cells are under `MIN_CELL` bytes
   (narrow column blocks, odd offsets) get regions of their own, so that the others keep wide cells.
2. **Blocks.** Blocks of one shape (outer rows, row stride, cells per row and per line) are gathered
   as a (blocks, cells) matrix of cell sums; weighting cell (r, k) by `2 m + 1`, m = r * lines +
   k // cells-per-line its line's index, and summing each row gives the digests.

Sums of sums, with the same odd weights, equal `digest`'s value modulo 2**64 whatever the grouping:
the digests are bit-identical to the per-run ones (and so to the trainer's). Runs the word view cannot
read (misaligned) or of very many small cells keep the per-run path.

On a GPU side stream, given the graph pools to share, a batch's ops are captured once per set of buffer
addresses as a CUDA graph and replayed: one launch instead of a few dozen, which was most of the host
time of a TP-changing refit's chunk loop (two H200s, TP2 -> TP1: the check cost 20 % of the refit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from refit import digest
from refit.graphs import capture

MIN_CELL = 64  # bytes: runs of smaller cells (narrow column blocks, odd offsets) get regions of their own
_SMALL_RUN_CELLS = 1 << 16  # a run of cells under MIN_CELL is batched up to this many of them (else: per run)
_GAP = 1 << 20  # bytes between runs that one region reads across rather than start another
_INDEX_CACHED = 1 << 18  # gather indices up to this many cells (2 MiB) are kept; larger ones are made each run
_GRAPHS = 4  # captured graphs kept per batch (one per set of buffer addresses: a chunk's slot, the engine's tensors)


@dataclass(frozen=True, slots=True)
class Span:
    """`count` consecutive blocks of a shard of geometry `geo`, the first (of outer row 0) at byte `at`
    of the buffer, its outer rows `row_stride` bytes apart (what `digest.block_digests` takes)."""

    geo: digest.Geometry
    at: int
    count: int
    row_stride: int

    def cell(self) -> int:
        """The largest cell (bytes) that tiles this span's lines at its offsets."""
        geo = self.geo
        line = math.gcd(geo.block_bytes // geo.word, digest.LINE_WORDS) * geo.word
        return math.gcd(self.at, line, self.row_stride if geo.outer > 1 else 0)

    def end(self) -> int:
        geo = self.geo
        rows = (geo.outer - 1) * self.row_stride if geo.outer > 1 else 0
        return self.at + rows + self.count * geo.block_bytes


@dataclass(slots=True)
class _Shape:
    """Blocks of one shape: their cells' places (bases + pattern) in the cell sums, and the cells' weights."""

    bases: torch.Tensor  # (blocks, 1): each block's first cell
    pattern: torch.Tensor  # (1, rows * cells per row): cell offsets within a block, row-major
    weights: torch.Tensor  # (1, rows * cells per row): 2 m + 1 of each cell's line
    index: torch.Tensor | None  # bases + pattern, when small enough to keep


class CellFill(Protocol):
    """A copy that lands a batch's bytes and makes its regions' fine cell sums as it goes (`run` issues
    it and returns the sums); `serial` tells one apart from any other, whatever its addresses."""

    serial: int

    def run(self) -> torch.Tensor: ...


@dataclass(slots=True)
class CellRegion:
    """Bytes [lo, hi) of one buffer as words of `word` bytes, summed in cells of `fine` bytes into the
    cell sums at `at`; `levels` are its coarser cells: (cells of fine[a:b] per coarse cell, a, b, at)."""

    buffer: Hashable
    word: int
    fine: int
    lo: int
    hi: int
    at: int
    levels: list[tuple[int, int, int, int]]


class BlockBatch:
    """The digests of `spans`, each in `buffers[i]` (a key of `run`'s buffers, at an address that is
    `bases[key]` mod 8), batched on `device`.

    `order` is the order in which `run`'s tensors, concatenated, hold the spans' digests (each span's
    `count` blocks in turn): spans of one block shape come together, then those left to the per-run path.
    One buffer (a staging slot) is read as one region per word size; several (the engine tensors that
    direct reads landed in) as a region each, every block shape still gathered once from all of them.
    """

    def __init__(
        self,
        spans: Sequence[Span],
        buffers: Sequence[Hashable],
        device: torch.device,
        bases: Mapping[Hashable, int],
        graph_pools: dict[int, object] | None = None,
    ) -> None:
        batched: dict[tuple[Hashable, int], list[int]] = {}  # (buffer, word size) -> spans
        single: list[int] = []
        for i, s in enumerate(spans):
            g, ws = s.cell(), s.geo.word
            aligned = (bases[buffers[i]] + s.at) % ws == 0 and (s.geo.outer == 1 or s.row_stride % ws == 0)
            if aligned and g % ws == 0 and (g >= MIN_CELL or (s.end() - s.at) // g <= _SMALL_RUN_CELLS):
                batched.setdefault((buffers[i], ws), []).append(i)
            else:
                single.append(i)
        self._regions: list[CellRegion] = []
        self._cells = 0  # cell sums of every region and level
        # (cell, outer rows, row stride in cells, block bytes, word) -> blocks' first cells, and their spans
        by_shape: dict[tuple[int, int, int, int, int], tuple[list[int], list[int]]] = {}
        for (buffer, ws), runs in batched.items():
            for members in _regions(spans, runs):
                self._region(spans, buffer, ws, members, by_shape)
        self._shapes: list[_Shape] = []
        order: list[int] = []
        for (g, _, rows_g, _, _), (firsts, idx) in by_shape.items():
            self._shapes.append(_shape(spans[idx[0]].geo, g, rows_g, firsts, device))
            order.extend(idx)
        self._single = [(buffers[i], spans[i]) for i in single]
        order.extend(single)
        self.order = tuple(order)
        self._device = device
        # Each region's words, by its buffers' addresses: a view reads the same bytes while its buffer
        # is where it was, and building views cost more host time than the sums they feed (direct reads:
        # a region per engine tensor). Two staging slots alternate; a few entries suffice.
        self._views: dict[tuple[int, ...], list[torch.Tensor]] = {}
        # Captured graphs by stream and buffer addresses (None: capture failed there, run eagerly). The
        # batches of one receiver share a memory pool per stream (`graph_pools`, by stream) for their
        # scratch: graphs of one stream run one after another, and their outputs lie outside the pool.
        self._pools = graph_pools
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]] | None] = {}

    def _region(
        self, spans: Sequence[Span], buffer: Hashable, ws: int, members: list[int],
        by_shape: dict[tuple[int, int, int, int, int], tuple[list[int], list[int]]],
    ) -> None:  # fmt: skip
        """A region over the spans `members` of `buffer` (words of `ws` bytes); their blocks go to `by_shape`."""
        lo, hi = min(spans[i].at for i in members), max(spans[i].end() for i in members)
        fine = min(spans[i].cell() for i in members)
        region = CellRegion(buffer=buffer, word=ws, fine=fine, lo=lo, hi=hi, at=self._cells, levels=[])
        self._cells += (hi - lo) // fine
        places: dict[int, tuple[int, int]] = {}  # cell -> (first, stop) bytes of its spans
        for i in members:
            s, g = spans[i], spans[i].cell()
            first, stop = places.get(g, (hi, lo))
            places[g] = (min(first, s.at), max(stop, s.end()))
        level_at = {fine: (lo, region.at)}  # cell -> (its first byte, its first cell in the sums)
        for g, (first, stop) in sorted(places.items()):
            if g != fine:  # coarser cells: sums of the fine ones (a few percent of the bytes, not all again)
                region.levels.append((g // fine, (first - lo) // fine, (stop - lo) // fine, self._cells))
                level_at[g] = (first, self._cells)
                self._cells += (stop - first) // g
        self._regions.append(region)
        for i in members:
            s, g = spans[i], spans[i].cell()
            first, at = level_at[g]
            rows_g = s.row_stride // g if s.geo.outer > 1 else 0
            firsts, idx = by_shape.setdefault((g, s.geo.outer, rows_g, s.geo.block_bytes, ws), ([], []))
            firsts.extend(at + (s.at + c * s.geo.block_bytes - first) // g for c in range(s.count))
            idx.append(i)

    @property
    def per_run(self) -> int:
        """Spans left to the per-run path."""
        return len(self._single)

    @property
    def regions(self) -> tuple[CellRegion, ...]:
        """Where the fine cell sums of each region go (what a `fill` given to `run` writes)."""
        return tuple(self._regions)

    @property
    def cells(self) -> int:
        """The int64 cell sums the tensor a `fill` returns holds (every region's and level's)."""
        return self._cells

    def run(self, buffers: Mapping[Hashable, torch.Tensor], fill: CellFill | None = None) -> list[torch.Tensor]:
        """The digests (int64) of every span in `order`, its buffer found in `buffers` (flat uint8
        tensors on the batch's device), issued on the current stream. `fill`: the copy that lands the
        bytes and makes the regions' fine cell sums as it goes (`refit.plan.checked_copy`), issued first
        (in the same graph): the bytes are not read again for them.

        Replayed from a graph (see the module's notes), the tensors are the graph's own: the next run
        with the same buffers overwrites them, so read them before that.
        """
        if self._pools is not None and self._device.type == "cuda":
            stream = torch.cuda.current_stream(self._device)
            if stream != torch.cuda.default_stream(self._device):  # a capture needs a side stream
                sid = stream.cuda_stream
                key = (sid, *(buffers[r.buffer].data_ptr() for r in self._regions),
                       *(buffers[b].data_ptr() for b, _ in self._single),
                       fill.serial if fill is not None else 0)  # fmt: skip
                kept = self._graphs.get(key)
                if kept is not None:
                    kept[0].replay()
                    return list(kept[1])
                if key not in self._graphs:
                    if len(self._graphs) >= _GRAPHS:
                        self._graphs.pop(next(iter(self._graphs)))
                    if sid not in self._pools:
                        self._pools[sid] = torch.cuda.graph_pool_handle()
                    out = self._issue(buffers, fill)  # this run's digests (and a warm-up before the capture)
                    self._graphs[key] = _capture(lambda: self._issue(buffers, fill), out, self._pools[sid])
                    return out
        return self._issue(buffers, fill)

    def _issue(self, buffers: Mapping[Hashable, torch.Tensor], fill: CellFill | None) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        given = fill.run() if fill is not None else None
        if self._shapes:
            cells = given if given is not None else torch.empty(self._cells, dtype=torch.int64, device=self._device)
            summed: Sequence[torch.Tensor | None] = (
                self._words_of(buffers) if given is None else [None] * len(self._regions)
            )
            for r, words in zip(self._regions, summed, strict=True):
                fine = cells[r.at : r.at + (r.hi - r.lo) // r.fine]
                if words is not None:  # narrow words widen (as `block_digests` does)
                    torch.sum(words, -1, dtype=torch.int64, out=fine)
                for k, a, b, at in r.levels:
                    torch.sum(fine[a:b].view(-1, k), -1, out=cells[at : at + (b - a) // k])
            for shape in self._shapes:
                index = shape.index if shape.index is not None else shape.bases + shape.pattern
                picked = cells.index_select(0, index.view(-1)).view(index.shape)
                out.append((picked * shape.weights).sum(-1))
        for buffer, s in self._single:
            out.append(digest.block_digests(buffers[buffer], s.at, s.geo, s.count, s.row_stride))
        return out

    def _words_of(self, buffers: Mapping[Hashable, torch.Tensor]) -> list[torch.Tensor]:
        key = tuple(buffers[r.buffer].data_ptr() for r in self._regions)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= 4:
                self._views.clear()
            views = self._views[key] = [
                buffers[r.buffer][r.lo : r.hi].view(digest.WORDS[r.word]).view(-1, r.fine // r.word)
                for r in self._regions
            ]
        return views


def _capture(
    issue: Callable[[], list[torch.Tensor]], like: Sequence[torch.Tensor], pool: object
) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]] | None:
    """`issue`'s ops as a CUDA graph captured on the current stream in `pool`, writing into outputs
    shaped `like` and allocated outside the graph; None where capture fails (the batch then runs
    eagerly).

    The outputs are copied out of the pool because graphs sharing a pool may reuse each other's scratch:
    an output left in the pool could be the scratch of a graph captured before it, and the digest
    checks of direct reads and of chunks interleave in whatever order the reads land. Measured on two
    H200s: with the outputs in the shared pool, a refit's check failed on its second replay.
    """
    outs = tuple(torch.empty_like(t) for t in like)

    def work() -> None:
        for out, got in zip(outs, issue(), strict=True):
            out.copy_(got)

    graph = capture(work, pool=pool)
    return None if graph is None else (graph, outs)


def _regions(spans: Sequence[Span], runs: list[int]) -> list[list[int]]:
    """`runs` (spans of one buffer and word size) cut into regions: by cell class (cells under MIN_CELL
    share a region only with their own size, so that a narrow column block's small cells do not cut a
    whole chunk that small) and, within a class, by offset, a new region across a gap over `_GAP` bytes.
    A region reads across the other classes' runs between its own (once more, in its cells): fewer ops."""
    out: list[list[int]] = []
    current: dict[int, tuple[list[int], int]] = {}  # class -> (its open region, where that region ends)
    for i in sorted(runs, key=lambda i: spans[i].at):
        s = spans[i]
        k = min(s.cell(), MIN_CELL)
        region, hi = current.get(k, (None, 0))
        if region is None or s.at > hi + _GAP:
            region, hi = [], s.end()
            out.append(region)
        region.append(i)
        current[k] = (region, max(hi, s.end()))
    return out


def _shape(geo: digest.Geometry, g: int, rows_g: int, firsts: list[int], device: torch.device) -> _Shape:
    """Blocks of `geo` in cells of `g` bytes, outer rows `rows_g` cells apart, first cells at `firsts`."""
    per_row = geo.block_bytes // g
    per_line = math.gcd(geo.block_bytes // geo.word, digest.LINE_WORDS) * geo.word // g
    r = np.arange(geo.outer, dtype=np.int64)[:, None]
    k = np.arange(per_row, dtype=np.int64)[None, :]
    pattern = (r * rows_g + k).reshape(1, -1)
    weights = ((r * (per_row // per_line) + k // per_line) * 2 + 1).reshape(1, -1)  # line m = r * lines + j
    b = np.asarray(firsts, dtype=np.int64).reshape(-1, 1)
    index = torch.from_numpy(b + pattern).to(device) if b.size * pattern.size <= _INDEX_CACHED else None
    return _Shape(bases=torch.from_numpy(b).to(device), pattern=torch.from_numpy(pattern).to(device),
                  weights=torch.from_numpy(weights).to(device), index=index)  # fmt: skip
