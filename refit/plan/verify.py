"""A receiver's check of pulled bytes against the block digests their trainer ranks published.

`DigestIndex` (built with a plan, from the full source records) finds the published shard under any
trainer byte and where its blocks' values sit in that rank's `DigestSet`; `Verifier` (one per fetch,
from the version's digest values) recomputes the digest of every block a piece or direct read holds
whole, where the bytes landed (staging, or engine memory), and compares. Blocks a read covers only in
part are not verified and are counted in `unverified_bytes` (see docs/reliability.md, "Digests").

A chunk's check is laid out once per plan (`Layout`, kept on the index): which runs of blocks it
digests, where, and which published values they must match. On a GPU its digests are then issued as
a `BlockBatch`: a few ops per chunk, not a few per piece (the per-piece ops were most of a TP-changing
refit's check there, on the chunk loop's critical path).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from refit import digest
from refit.errors import DigestError, LayoutError
from refit.plan.check_layout import Layout, Pending
from refit.plan.checked_copy import CheckedCopy, Mapped, address_key, places_of
from refit.plan.digest_batch import Span
from refit.plan.digest_index import DigestIndex, Entry
from refit.plan.records import DirectRead, Piece
from refit.types import SourceRecord

logger = logging.getLogger(__name__)

_MAX_RUNS = 64  # a packed piece of more runs than this along a rows-axis shard is not verified
_MAX_LAYOUTS = 1024  # layouts kept per index (a plan's chunks and direct batches; more only in odd callers)


@dataclass(kw_only=True, slots=True)
class Totals:
    """A receiver's digest checks over every refit (what `ReceiverStats` reports)."""

    verified_bytes: int = 0
    unverified_bytes: int = 0
    seconds: float = 0.0

    def absorb(self, verifier: Verifier | None, timings: dict[str, float]) -> None:
        """Add one refit's checks (once: the verifier's counts restart); its "verify" seconds unless the
        streamed install already timed the wall time they added (the direct check overlaps the install)."""
        if verifier is None:
            return
        timings.setdefault("verify", verifier.seconds)
        self.verified_bytes += verifier.verified_bytes
        self.unverified_bytes += verifier.unverified_bytes
        self.seconds += verifier.seconds
        verifier.verified_bytes = verifier.unverified_bytes = 0
        verifier.seconds = 0.0


class Verifier:
    """Checks the pulled bytes of one version against its digests; accumulates what it verified.

    `batched`: issue a chunk's (or direct batch's) digests as one `BlockBatch`; None (the default): where
    the bytes are on a GPU, whose cost is issuing ops. On the CPU the per-run ops (`digest.block_digests`,
    the reference the tests compare the batch with) do the arithmetic anyway, and the batch's gathers
    of small cells were as often slower as faster (0.7-2x the per-run time on 2 cores). Digests are equal.
    """

    def __init__(
        self, index: DigestIndex, sources: Sequence[SourceRecord], *, version: int, batched: bool | None = None
    ) -> None:
        self._index = index
        self._values, self._flat = self._bind(sources, version)
        self._version = version
        self._ranks = tuple(sorted(self._values))
        self.batched = batched
        self.verified_bytes = 0
        self.unverified_bytes = 0
        self.seconds = 0.0

    def _bind(self, sources: Sequence[SourceRecord], version: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Each rank's published digests of `version`, and all of them at their places in one array."""
        index = self._index
        values_of: dict[int, np.ndarray] = {}
        for s in sources:
            values = digest.unpack(s.digests)
            want = index.counts.get(s.rank, 0)
            if len(values) == 0:
                continue  # a trainer that publishes no digests: its bytes count as unverified
            if len(values) != want:
                raise LayoutError(f"trainer rank {s.rank} sent {len(values)} digests of v{version} for {want} blocks")
            values_of[s.rank] = values
        flat = np.zeros(sum(index.counts.values()), dtype=np.int64)
        for rank, values in values_of.items():
            flat[index.offsets[rank] : index.offsets[rank] + len(values)] = values
        return values_of, flat

    # -- public ---------------------------------------------------------------------------------------

    @property
    def ranks(self) -> tuple[int, ...]:
        """The trainer ranks whose digests this check compares with (the layouts it keeps depend on them)."""
        return self._ranks

    def expect(self, sources: Sequence[SourceRecord], version: int) -> None:
        """Compare with `sources`' digests of `version` from now on: a pull begun before the catalog
        sent them (its launches digest what lands; only `compare` needs the values). The same ranks
        must publish digests, for the same blocks (LayoutError otherwise, nothing changed). Safe beside
        launches on another thread: what they read of the values (which ranks have them) stays the same."""
        values, flat = self._bind(sources, version)
        if tuple(sorted(values)) != self._ranks:
            raise LayoutError(f"v{version}: trainer ranks {sorted(values)} publish digests, not {list(self._ranks)}")
        self._flat, self._values, self._version = flat, values, version

    def pieces(self, pieces: Sequence[Piece], buf: torch.Tensor) -> None:
        """Verify the staged `pieces` in `buf` (a flat uint8 staging slot); raises DigestError."""
        self.compare(self.launch(pieces, buf))

    def launch(self, pieces: Sequence[Piece], buf: torch.Tensor) -> Pending:
        """Start the digests of the staged `pieces` in `buf` on the current stream, without waiting;
        `compare` checks them (the slot must not be refilled before they ran)."""
        t0 = time.perf_counter()
        batched = buf.is_cuda if self.batched is None else self.batched
        device, base = (buf.device, buf.data_ptr() % 8) if batched else (None, 0)
        layout = self._layout(("pieces", device, base), pieces, lambda: self._chunk_layout(pieces, device, base))
        pending = self._start(layout, {None: buf})
        self.seconds += time.perf_counter() - t0
        return pending

    def compare(self, pending: Pending) -> None:
        """Wait for launched digests (one host sync for all of them) and compare; raises DigestError."""
        t0 = time.perf_counter()
        self._compare(pending)
        self.seconds += time.perf_counter() - t0

    def direct(self, reads: Sequence[DirectRead], dests: Mapping[str, torch.Tensor]) -> None:
        """Verify direct reads where they landed, in the engine's tensors `dests`; raises DigestError."""
        self.compare(self.launch_direct(reads, dests))

    def launch_direct(self, reads: Sequence[DirectRead], dests: Mapping[str, torch.Tensor]) -> Pending:
        """Start the digests of direct reads where they landed, in `dests`, on the current stream (as
        `launch`); a streamed install checks each batch of direct reads as it lands this way."""
        t0 = time.perf_counter()
        layout, flat = self._direct(reads, dests)
        pending = self._start(layout, flat)
        self.seconds += time.perf_counter() - t0
        return pending

    def copier(
        self, reads: Sequence[DirectRead], dests: Mapping[str, torch.Tensor], mapped: Mapped
    ) -> CheckedCopy | None:
        """The copies of direct `reads` out of the trainers' `mapped` regions into `dests` that also make
        their check's cell sums (`refit.plan.checked_copy`), laid out once per plan and addresses; None
        where they cannot be (then: copy, and `launch_direct` once they landed)."""
        return self._copier(self._direct(reads, dests)[0], reads, dests, mapped)

    def _copier(
        self, layout: Layout, reads: Sequence[DirectRead], dests: Mapping[str, torch.Tensor], mapped: Mapped
    ) -> CheckedCopy | None:
        if layout.batch is None:
            return None
        if layout.copy_places is None:
            layout.copy_places = places_of(reads)
        key = address_key(layout.copy_places, dests, mapped)
        if layout.copy_key != key:
            # Written through, so only contiguous tensors (a reshape of any other would be a copy).
            targets = [t for t in layout.copy_places[0] if t in dests and dests[t].is_contiguous()]
            flat = {t: dests[t].detach().view(-1).view(torch.uint8) for t in targets}
            layout.copy, layout.copy_key = CheckedCopy.build(layout.batch, reads, flat, mapped), key
        return layout.copy

    def copy_direct(self, reads: Sequence[DirectRead], dests: Mapping[str, torch.Tensor], mapped: Mapped) -> Pending:
        """Copy direct `reads` out of `mapped` into `dests` and start their digests from the same pass, on
        the current stream (compared by `compare`, as `launch_direct`'s); `copier` must have laid them out."""
        t0 = time.perf_counter()
        layout, flat = self._direct(reads, dests)
        copy = self._copier(layout, reads, dests, mapped)
        if copy is None:
            raise LayoutError("these direct reads cannot be copied and digested in one pass (ask `copier` first)")
        pending = self._start(layout, flat, copy)
        self.seconds += time.perf_counter() - t0
        return pending

    def _direct(
        self, reads: Sequence[DirectRead], dests: Mapping[str, torch.Tensor]
    ) -> tuple[Layout, dict[str | None, torch.Tensor]]:
        """The check's layout of a direct batch, and the engine tensors it reads as flat bytes."""
        device = next((dests[d.target].device for d in reads[:1] if d.target in dests), None)
        batched = device is not None and (device.type == "cuda" if self.batched is None else self.batched)
        kind = ("direct", device if batched else None)
        layout = self._layout(kind, reads, lambda: self._direct_layout(reads, dests, kind[1]))
        flat = layout.flat(dests)
        if not layout.fits(flat):  # an engine tensor moved to another alignment: batch anew
            layout = self._layout(kind, reads, lambda: self._direct_layout(reads, dests, kind[1]), renew=True)
            flat = layout.flat(dests)
        return layout, flat

    # -- layouts --------------------------------------------------------------------------------------

    def _layout(
        self, kind: tuple[object, ...], items: Sequence[object], make: Callable[[], Layout], renew: bool = False
    ) -> Layout:
        """The cached layout of `items` (a plan's chunk pieces or direct batch: the same objects every
        refit of the plan), made by `make` on first use (or `renew`); valid while the same ranks have digests."""
        key = (*kind, id(items[0]) if items else 0, len(items), self._ranks)
        cached = self._index.layouts.get(key)
        if not renew and cached is not None and all(a is b for a, b in zip(cached[0], items, strict=True)):
            return cached[1]
        layout = make()
        if len(self._index.layouts) >= _MAX_LAYOUTS:
            self._index.layouts.pop(next(iter(self._index.layouts)))
        self._index.layouts[key] = (tuple(items), layout)
        return layout

    def _start(
        self, layout: Layout, buffers: Mapping[str | None, torch.Tensor], fill: CheckedCopy | None = None
    ) -> Pending:
        self.verified_bytes += layout.verified
        self.unverified_bytes += layout.unverified
        if not layout.checks:
            if fill is not None:
                fill.run()
            return Pending()
        return Pending(got=layout.run(buffers, fill), checks=list(layout.checks), want=[layout.want])

    def _chunk_layout(self, pieces: Sequence[Piece], device: torch.device | None, base: int) -> Layout:
        layout = Layout()
        for p in pieces:
            if (entry := self._entry(p, layout)) is not None:
                self._piece(p, entry, layout)
        return layout.finish(self._index.offsets, device, {None: base}, self._index.graph_pools)

    def _direct_layout(
        self, reads: Sequence[DirectRead], dests: Mapping[str, torch.Tensor], device: torch.device | None
    ) -> Layout:
        layout = Layout()
        for d in reads:
            if (entry := self._entry(d, layout)) is None:
                continue
            a = d.remote_offset - entry.desc.byte_offset
            self._run(layout, d.target, d.rank, entry, d.offset, a, d.nbytes, [(a, d.nbytes)])
        bases = {n: dests[n].data_ptr() % 8 for n in layout.buffers if n is not None}
        return layout.finish(self._index.offsets, device, bases, self._index.graph_pools)

    def _entry(self, read: Piece | DirectRead, layout: Layout) -> Entry | None:
        """The digested shard `read` starts in; None (its bytes counted unverified) when it has no digests."""
        entry = self._index.find(read.rank, read.region, read.remote_offset)
        if entry is None or read.rank not in self._values:
            layout.unverified += read.nbytes
            return None
        return entry

    # -- one piece ------------------------------------------------------------------------------------

    def _piece(self, p: Piece, entry: Entry, layout: Layout) -> None:
        a = p.remote_offset - entry.desc.byte_offset
        needed = [(a + i * p.remote_stride, p.block_bytes) for i in range(p.count)]
        geo = entry.geo
        if geo.columns and geo.outer > 1 and not (p.count == 1 and a == 0 and p.nbytes == entry.desc.nbytes):
            # A column slice of every outer row: strided in the trainer, packed or enclosed in staging.
            if p.count != geo.outer or p.remote_stride != geo.row_bytes:
                layout.unverified += p.nbytes
                return
            stride = p.local_stride or p.block_bytes
            self._columns(layout, p.rank, entry, p.local_offset, a, p.block_bytes, stride)
            return
        if p.local_stride or p.count == 1:  # one contiguous run in staging (an enclosing block, or a range)
            span = (p.count - 1) * p.local_stride + p.block_bytes if p.local_stride else p.block_bytes
            self._run(layout, None, p.rank, entry, p.local_offset, a, span, needed)
        elif p.count <= _MAX_RUNS:
            for i, (start, size) in enumerate(needed):
                self._run(layout, None, p.rank, entry, p.local_offset + i * p.block_bytes, start, size, [(start, size)])
        else:
            layout.unverified += p.nbytes

    def _run(
        self, layout: Layout, buffer: str | None, rank: int, entry: Entry, at: int, a: int, size: int,
        needed: list[tuple[int, int]],
    ) -> None:  # fmt: skip
        """Bytes `[a, a + size)` of the shard, contiguous at `at` of `buffer`: verify the blocks they hold whole."""
        geo = entry.geo
        total = sum(n for _, n in needed)
        if geo.columns and geo.outer > 1:  # only the whole shard holds whole column blocks
            whole = a == 0 and size == entry.desc.nbytes
            first, stop, lo, covered = 0, geo.blocks if whole else 0, 0, total if whole else 0
        else:
            first, stop = -(-a // geo.block_bytes), (a + size) // geo.block_bytes
            lo, hi = first * geo.block_bytes, stop * geo.block_bytes
            covered = sum(max(0, min(s + n, hi) - max(s, lo)) for s, n in needed) if stop > first else 0
        layout.unverified += total - covered
        if stop <= first:
            return
        layout.verified += (stop - first) * geo.block_bytes * geo.outer
        span = Span(geo, at + lo - a, stop - first, geo.row_bytes)
        layout.add(buffer, rank, entry, first, stop - first, span)

    def _columns(self, layout: Layout, rank: int, entry: Entry, at: int, a: int, width: int, stride: int) -> None:
        """Columns `[a, a + width)` (bytes of row 0) of every outer row, rows `stride` apart at `buf[at]`."""
        geo = entry.geo
        first, stop = -(-a // geo.block_bytes), (a + width) // geo.block_bytes
        lo, hi = first * geo.block_bytes, stop * geo.block_bytes
        covered = max(0, min(a + width, hi) - max(a, lo)) if stop > first else 0
        layout.unverified += (width - covered) * geo.outer
        if stop <= first:
            return
        layout.verified += covered * geo.outer
        layout.add(None, rank, entry, first, stop - first, Span(geo, at + lo - a, stop - first, stride))

    # -- comparison -----------------------------------------------------------------------------------

    def _compare(self, pending: Pending) -> None:
        if not pending.got:
            return
        computed = torch.cat(pending.got).cpu().numpy()  # one device sync for the whole batch
        expected = self._flat[np.concatenate(pending.want)]
        if np.array_equal(computed, expected):
            return
        at = int(np.flatnonzero(computed != expected)[0])
        for c in pending.checks:
            if at < c.count:
                block = c.block + at
                raise DigestError(
                    f"v{self._version}: {c.entry.desc.name} from trainer rank {c.rank}: block {block} "
                    f"(of {c.entry.geo.blocks}) does not match its published digest; the bytes pulled differ "
                    "from what the trainer published (corrupted in trainer memory or in transit)",
                    tensor=c.entry.desc.name, rank=c.rank, version=self._version, block=block,
                )  # fmt: skip
            at -= c.count
