"""One check's layout (`Layout`): the runs of blocks a staged chunk or a batch of direct reads holds,
where they lie, what published values they must match, and the batched ops that digest them, kept with
the plan (`refit.plan.verify` makes and runs them); the digests launched and not yet compared (`Pending`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from refit import digest
from refit.plan.checked_copy import CheckedCopy
from refit.plan.digest_batch import BlockBatch, Span
from refit.plan.digest_index import Entry


@dataclass(kw_only=True, slots=True)
class Check:
    rank: int
    entry: Entry
    block: int  # first block
    count: int


@dataclass(kw_only=True, slots=True)
class Pending:
    """Digests launched on a device and the blocks they are to match (`Verifier.launch`)."""

    got: list[torch.Tensor] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    want: list[np.ndarray] = field(default_factory=list)  # flat indices of the expected values (`DigestIndex.offsets`)

    def extend(self, other: Pending) -> None:
        self.got.extend(other.got)
        self.checks.extend(other.checks)
        self.want.extend(other.want)


@dataclass(kw_only=True, slots=True)
class Layout:
    """One chunk's (or direct batch's) check: the runs of blocks to digest, by buffer, and what they match.

    `buffers[i]` (None: the staging slot; else an engine tensor's name) holds `spans[i]`, whose digests
    are `checks[i]`'s blocks; `want` is every check's expected values' flat indices, in order.
    """

    buffers: list[str | None] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    verified: int = 0
    unverified: int = 0
    want: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    names: tuple[str, ...] = ()  # the engine tensors of direct reads
    bases: dict[str | None, int] = field(default_factory=dict)
    batch: BlockBatch | None = None
    flat_key: tuple[int, ...] | None = None
    flat_views: dict[str | None, torch.Tensor] = field(default_factory=dict)
    # The batch copied and digested in one pass (`Verifier.copier`), for the addresses `copy_key`.
    copy_places: tuple[tuple[str, ...], tuple[tuple[int, int], ...]] | None = None
    copy_key: tuple[int, ...] | None = None
    copy: CheckedCopy | None = None

    def add(self, buffer: str | None, rank: int, entry: Entry, first: int, count: int, span: Span) -> None:
        self.buffers.append(buffer)
        self.spans.append(span)
        self.checks.append(Check(rank=rank, entry=entry, block=first, count=count))

    def finish(self, offsets: Mapping[int, int], device: torch.device | None, bases: Mapping[str | None, int],
               graph_pools: dict[int, object] | None = None) -> Layout:  # fmt: skip
        """Batch the runs on `device` (when given; each buffer at an address that is `bases[buffer]` mod 8;
        captured as CUDA graphs in `graph_pools` where given) and index the expected values, in the order
        the digests come out."""
        self.names = tuple(sorted({b for b in self.buffers if b is not None}))
        self.bases = dict(bases)
        if device is not None and self.spans:
            self.batch = BlockBatch(self.spans, self.buffers, device, self.bases, graph_pools)
            self.checks = [self.checks[i] for i in self.batch.order]
            self.spans = [self.spans[i] for i in self.batch.order]
            self.buffers = [self.buffers[i] for i in self.batch.order]
        counts = np.fromiter((c.count for c in self.checks), dtype=np.int64, count=len(self.checks))
        starts = np.fromiter((offsets[c.rank] + c.entry.first + c.block for c in self.checks), dtype=np.int64,
                             count=len(self.checks))  # fmt: skip
        ends = np.cumsum(counts)
        self.want = np.repeat(starts - ends + counts, counts) + np.arange(int(ends[-1]) if len(ends) else 0)
        return self

    def flat(self, dests: Mapping[str, torch.Tensor]) -> dict[str | None, torch.Tensor]:
        """The engine tensors this layout's runs lie in, as flat bytes (kept while they stay where they
        were: three view ops per tensor, each launch, were as much host time as its digest)."""
        key = tuple(dests[n].data_ptr() for n in self.names)
        if key != self.flat_key:
            self.flat_key = key
            self.flat_views = {n: dests[n].detach().reshape(-1).view(torch.uint8) for n in self.names}
        return self.flat_views

    def fits(self, buffers: Mapping[str | None, torch.Tensor]) -> bool:
        """Whether a batch made for `bases` serves `buffers` (its alignment decides which runs it batches)."""
        return self.batch is None or all(buffers[n].data_ptr() % 8 == self.bases[n] for n in buffers)

    def run(self, buffers: Mapping[str | None, torch.Tensor], fill: CheckedCopy | None = None) -> list[torch.Tensor]:
        if self.batch is not None:
            return self.batch.run(buffers, fill)
        return [digest.block_digests(buffers[b], s.at, s.geo, s.count, s.row_stride)
                for b, s in zip(self.buffers, self.spans, strict=True)]  # fmt: skip
