"""A receiver's check of pulled bytes against the block digests their trainer ranks published.

`DigestIndex` (built with a plan, from the full source records) finds the published shard under any
trainer byte and where its blocks' values sit in that rank's `DigestSet`; `Verifier` (one per fetch,
from the version's digest values) recomputes the digest of every block a piece or direct read holds
whole, where the bytes landed (staging, or engine memory), and compares. Blocks a read covers only in
part are not verified and are counted in `unverified_bytes` (see docs/reliability.md, "Digests").
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from refit import digest
from refit.errors import DigestError, LayoutError
from refit.plan.records import DirectRead, Piece
from refit.types import SourceRecord, TensorDesc

logger = logging.getLogger(__name__)

_MAX_RUNS = 64  # a packed piece of more runs than this along a rows-axis shard is not verified


@dataclass(frozen=True, kw_only=True, slots=True)
class _Entry:
    desc: TensorDesc
    geo: digest.Geometry
    first: int  # index of its first block in the rank's digest values


class DigestIndex:
    """Where each published shard's block digests are, by trainer rank, region and byte offset."""

    def __init__(self, sources: Iterable[SourceRecord]) -> None:
        self._by_place: dict[tuple[int, int], tuple[list[int], list[_Entry]]] = {}
        self.counts: dict[int, int] = {}
        for s in sources:
            at = 0
            entries: dict[int, list[_Entry]] = {}
            for t in s.tensors:
                geo = digest.geometry(t)
                if geo is None:
                    continue
                entries.setdefault(t.region, []).append(_Entry(desc=t, geo=geo, first=at))
                at += geo.blocks
            self.counts[s.rank] = at
            for region, found in entries.items():
                found.sort(key=lambda e: e.desc.byte_offset)
                self._by_place[(s.rank, region)] = ([e.desc.byte_offset for e in found], found)

    def find(self, rank: int, region: int, offset: int) -> _Entry | None:
        """The shard of `rank` holding the byte at `offset` of `region`, if it has digests."""
        place = self._by_place.get((rank, region))
        if place is None:
            return None
        starts, entries = place
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0:
            return None
        e = entries[i]
        return e if offset < e.desc.byte_offset + e.desc.nbytes else None


@dataclass(kw_only=True, slots=True)
class _Check:
    rank: int
    entry: _Entry
    block: int  # first block
    count: int


@dataclass(kw_only=True, slots=True)
class Pending:
    """Digests launched on a device and the blocks they are to match (`Verifier.launch`)."""

    got: list[torch.Tensor] = field(default_factory=list)
    checks: list[_Check] = field(default_factory=list)

    def extend(self, other: Pending) -> None:
        self.got.extend(other.got)
        self.checks.extend(other.checks)


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
    """Checks the pulled bytes of one version against its digests; accumulates what it verified."""

    def __init__(self, index: DigestIndex, sources: Sequence[SourceRecord], *, version: int) -> None:
        self._index = index
        self._version = version
        self._values: dict[int, np.ndarray] = {}
        for s in sources:
            values = digest.unpack(s.digests)
            want = index.counts.get(s.rank, 0)
            if len(values) == 0:
                continue  # a trainer that publishes no digests: its bytes count as unverified
            if len(values) != want:
                raise LayoutError(f"trainer rank {s.rank} sent {len(values)} digests of v{version} for {want} blocks")
            self._values[s.rank] = values
        self.verified_bytes = 0
        self.unverified_bytes = 0
        self.seconds = 0.0

    # -- public ---------------------------------------------------------------------------------------

    def pieces(self, pieces: Sequence[Piece], buf: torch.Tensor) -> None:
        """Verify the staged `pieces` in `buf` (a flat uint8 staging slot); raises DigestError."""
        self.compare(self.launch(pieces, buf))

    def launch(self, pieces: Sequence[Piece], buf: torch.Tensor) -> Pending:
        """Start the digests of the staged `pieces` in `buf` on the current stream, without waiting;
        `compare` checks them (the slot must not be refilled before they ran)."""
        t0 = time.perf_counter()
        pending = Pending()
        for p in pieces:
            entry = self._index.find(p.rank, p.region, p.remote_offset)
            if entry is None or p.rank not in self._values:
                self.unverified_bytes += p.nbytes
                continue
            self._piece(p, entry, buf, pending.got, pending.checks)
        self.seconds += time.perf_counter() - t0
        return pending

    def compare(self, pending: Pending) -> None:
        """Wait for launched digests (one host sync for all of them) and compare; raises DigestError."""
        t0 = time.perf_counter()
        self._compare(pending.got, pending.checks)
        self.seconds += time.perf_counter() - t0

    def direct(self, reads: Sequence[DirectRead], dests: Mapping[str, torch.Tensor]) -> None:
        """Verify direct reads where they landed, in the engine's tensors `dests`; raises DigestError."""
        self.compare(self.launch_direct(reads, dests))

    def launch_direct(self, reads: Sequence[DirectRead], dests: Mapping[str, torch.Tensor]) -> Pending:
        """Start the digests of direct reads where they landed, in `dests`, on the current stream (as
        `launch`); a streamed install checks each batch of direct reads as it lands this way."""
        t0 = time.perf_counter()
        pending = Pending()
        for d in reads:
            entry = self._index.find(d.rank, d.region, d.remote_offset)
            if entry is None or d.rank not in self._values:
                self.unverified_bytes += d.nbytes
                continue
            buf = dests[d.target].detach().reshape(-1).view(torch.uint8)
            a = d.remote_offset - entry.desc.byte_offset
            self._run(d.rank, entry, buf, d.offset, a, d.nbytes, [(a, d.nbytes)], pending.got, pending.checks)
        self.seconds += time.perf_counter() - t0
        return pending

    # -- one piece ------------------------------------------------------------------------------------

    def _piece(self, p: Piece, entry: _Entry, buf: torch.Tensor, got: list, checks: list) -> None:
        a = p.remote_offset - entry.desc.byte_offset
        needed = [(a + i * p.remote_stride, p.block_bytes) for i in range(p.count)]
        geo = entry.geo
        if geo.columns and geo.outer > 1 and not (p.count == 1 and a == 0 and p.nbytes == entry.desc.nbytes):
            # A column slice of every outer row: strided in the trainer, packed or enclosed in staging.
            if p.count != geo.outer or p.remote_stride != geo.row_bytes:
                self.unverified_bytes += p.nbytes
                return
            stride = p.local_stride or p.block_bytes
            self._columns(p.rank, entry, buf, p.local_offset, a, p.block_bytes, stride, got, checks)
            return
        if p.local_stride or p.count == 1:  # one contiguous run in staging (an enclosing block, or a range)
            span = (p.count - 1) * p.local_stride + p.block_bytes if p.local_stride else p.block_bytes
            self._run(p.rank, entry, buf, p.local_offset, a, span, needed, got, checks)
        elif p.count <= _MAX_RUNS:
            for i, (start, size) in enumerate(needed):
                self._run(p.rank, entry, buf, p.local_offset + i * p.block_bytes, start, size, [(start, size)],
                          got, checks)  # fmt: skip
        else:
            self.unverified_bytes += p.nbytes

    def _run(
        self, rank: int, entry: _Entry, buf: torch.Tensor, at: int, a: int, size: int,
        needed: list[tuple[int, int]], got: list, checks: list,
    ) -> None:  # fmt: skip
        """Bytes `[a, a + size)` of the shard, contiguous at `buf[at]`: verify the blocks they hold whole."""
        geo = entry.geo
        total = sum(n for _, n in needed)
        if geo.columns and geo.outer > 1:  # only the whole shard holds whole column blocks
            whole = a == 0 and size == entry.desc.nbytes
            first, stop, lo, covered = 0, geo.blocks if whole else 0, 0, total if whole else 0
        else:
            first, stop = -(-a // geo.block_bytes), (a + size) // geo.block_bytes
            lo, hi = first * geo.block_bytes, stop * geo.block_bytes
            covered = sum(max(0, min(s + n, hi) - max(s, lo)) for s, n in needed) if stop > first else 0
        self.unverified_bytes += total - covered
        if stop <= first:
            return
        self.verified_bytes += (stop - first) * geo.block_bytes * geo.outer
        got.append(digest.block_digests(buf, at + lo - a, geo, stop - first, geo.row_bytes))
        checks.append(_Check(rank=rank, entry=entry, block=first, count=stop - first))

    def _columns(
        self, rank: int, entry: _Entry, buf: torch.Tensor, at: int, a: int, width: int, stride: int,
        got: list, checks: list,
    ) -> None:  # fmt: skip
        """Columns `[a, a + width)` (bytes of row 0) of every outer row, rows `stride` apart at `buf[at]`."""
        geo = entry.geo
        first, stop = -(-a // geo.block_bytes), (a + width) // geo.block_bytes
        lo, hi = first * geo.block_bytes, stop * geo.block_bytes
        covered = max(0, min(a + width, hi) - max(a, lo)) if stop > first else 0
        self.unverified_bytes += (width - covered) * geo.outer
        if stop <= first:
            return
        self.verified_bytes += covered * geo.outer
        got.append(digest.block_digests(buf, at + lo - a, geo, stop - first, stride))
        checks.append(_Check(rank=rank, entry=entry, block=first, count=stop - first))

    # -- comparison -----------------------------------------------------------------------------------

    def _compare(self, got: list[torch.Tensor], checks: list[_Check]) -> None:
        if not got:
            return
        computed = torch.cat(got).cpu().numpy()  # one device sync for the whole batch
        expected = np.concatenate(
            [self._values[c.rank][c.entry.first + c.block : c.entry.first + c.block + c.count] for c in checks]
        )
        if np.array_equal(computed, expected):
            return
        at = int(np.flatnonzero(computed != expected)[0])
        for c in checks:
            if at < c.count:
                block = c.block + at
                raise DigestError(
                    f"v{self._version}: {c.entry.desc.name} from trainer rank {c.rank}: block {block} "
                    f"(of {c.entry.geo.blocks}) does not match its published digest; the bytes pulled differ "
                    "from what the trainer published (corrupted in trainer memory or in transit)",
                    tensor=c.entry.desc.name, rank=c.rank, version=self._version, block=block,
                )  # fmt: skip
            at -= c.count
