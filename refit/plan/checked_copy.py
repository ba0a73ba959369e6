"""Direct reads copied out of the trainers' mapped memory and digested in the same pass.

A receiver whose trainer ranks are mapped on its own GPU (`refit.transport.cuda_ipc`) can copy a batch
of direct reads with kernels of its own rather than with `cudaMemcpyAsync`. With digests on, the copy
then also makes the cell sums the batch's check starts from (`refit.kernels.copy_sum`), and the check
does not read the engine's tensors again: each byte crosses the GPU's memory once each way, as in an
unchecked copy, instead of once more for the digest (one H200, llama-8gb: the check took a refit from
5.1 to 8.9 ms).

`CheckedCopy.build` lays a batch out once per plan and engine tensors: each read's part inside a region
of the batch's `BlockBatch` (`BlockBatch.regions`) is a run summed into that region's fine cells, the
parts outside any region (bytes the check does not cover) are plain copies. A batch it cannot lay out
so (words narrower than 8 bytes, unaligned runs, a read across regions) gets None: it is copied and
checked as before.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence

import torch

from refit.kernels import copy_sum
from refit.plan.digest_batch import BlockBatch, CellRegion
from refit.plan.records import DirectRead

# The trainers' regions mapped in this process, by (rank, region index).
Mapped = Mapping[tuple[int, int], torch.Tensor]

_SERIALS = itertools.count(1)


class CheckedCopy:
    """A batch of direct reads as copies that make its check's cell sums; `run` issues them."""

    def __init__(self, groups: list[copy_sum.CopySum], cells: torch.Tensor) -> None:
        self._groups = groups
        self.cells = cells
        self.runs = sum(len(g.runs) for g in groups)
        # The check's graphs replay these copies by their tables' addresses: a copy laid out anew (at
        # another address, or at the same one once this one is freed) must not match their key.
        self.serial = next(_SERIALS)

    @staticmethod
    def build(
        batch: BlockBatch, reads: Sequence[DirectRead], flat: Mapping[str, torch.Tensor], mapped: Mapped
    ) -> CheckedCopy | None:
        """The copies of `reads` (into `flat`, the engine tensors as flat bytes) out of `mapped`, making
        `batch`'s fine cell sums; None where the batch cannot be copied so."""
        regions: dict[Hashable, list[CellRegion]] = {}
        for r in batch.regions:
            if r.word != 8:
                return None  # narrow words are widened before they are summed: not this kernel's sums
            regions.setdefault(r.buffer, []).append(r)
        by_cell: dict[int, list[copy_sum.Run]] = {}
        plain: list[copy_sum.Run] = []
        for d in reads:
            source = mapped.get((d.rank, d.region))
            if source is None or d.target not in flat:
                return None
            end = d.offset + d.nbytes
            hits = [r for r in regions.get(d.target, ()) if r.lo < end and d.offset < r.hi]
            if len(hits) > 1:
                return None
            parts = [(d.offset, end, None)]
            if hits:
                r = hits[0]
                a, b = max(d.offset, r.lo), min(end, r.hi)
                if (a - r.lo) % r.fine or (b - a) % r.fine:
                    return None
                parts = [(d.offset, a, None), (a, b, r), (b, end, None)]
            for a, b, r in parts:
                if a == b:
                    continue
                at = d.remote_offset + a - d.offset
                run = copy_sum.Run(
                    source[at : at + b - a], flat[d.target][a:b], -1 if r is None else r.at + (a - r.lo) // r.fine
                )
                cell = 8 if r is None else r.fine
                if not copy_sum.fits(run.src, run.dst, cell, r is not None):
                    return None
                (plain if r is None else by_cell.setdefault(cell, [])).append(run)
        if not by_cell:  # nothing summed (every check of the batch is per run): plain copies alone
            by_cell[copy_sum.TILE_WORDS * 8] = []
        by_cell[next(iter(by_cell))].extend(plain)
        groups = [copy_sum.CopySum(runs, cell=cell) for cell, runs in by_cell.items()]
        device = next(iter(flat.values())).device
        return CheckedCopy(groups, torch.empty(batch.cells, dtype=torch.int64, device=device))

    def run(self) -> torch.Tensor:
        """Copy the batch and make its fine cell sums (`cells`), on the current stream (`BlockBatch.run`
        issues this before the digests, in the same graph)."""
        for g in self._groups:
            g.run(self.cells)
        return self.cells


def places_of(reads: Sequence[DirectRead]) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
    """The engine tensors and the trainer (rank, region)s `reads` copy between."""
    return tuple(sorted({d.target for d in reads})), tuple(sorted({(d.rank, d.region) for d in reads}))


def address_key(
    places: tuple[tuple[str, ...], tuple[tuple[int, int], ...]], dests: Mapping[str, torch.Tensor], mapped: Mapped
) -> tuple[int, ...]:
    """The addresses a `CheckedCopy` between `places` (`places_of`) is laid out for."""
    targets, regions = places
    return (*(dests[t].data_ptr() if t in dests else -1 for t in targets),
            *(mapped[p].data_ptr() if p in mapped else -1 for p in regions))  # fmt: skip
