"""Where each published shard's block digests are: by trainer rank, region and byte offset (the index a
receiver's check, `refit.plan.verify`, finds a pulled byte's digests with, built once per plan)."""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from refit import digest
from refit.types import SourceRecord, TensorDesc


@dataclass(frozen=True, kw_only=True, slots=True)
class Entry:
    """A published shard with digests: its descriptor, its blocks, where its values start."""

    desc: TensorDesc
    geo: digest.Geometry
    first: int  # index of its first block in the rank's digest values


class DigestIndex:
    """Where each published shard's block digests are, by trainer rank, region and byte offset."""

    def __init__(self, sources: Iterable[SourceRecord]) -> None:
        self._by_place: dict[tuple[int, int], tuple[list[int], list[Entry]]] = {}
        self.counts: dict[int, int] = {}
        for s in sources:
            at = 0
            entries: dict[int, list[Entry]] = {}
            for t in s.tensors:
                geo = digest.geometry(t)
                if geo is None:
                    continue
                entries.setdefault(t.region, []).append(Entry(desc=t, geo=geo, first=at))
                at += geo.blocks
            self.counts[s.rank] = at
            for region, found in entries.items():
                found.sort(key=lambda e: e.desc.byte_offset)
                self._by_place[(s.rank, region)] = ([e.desc.byte_offset for e in found], found)
        # Each rank's values at an offset of one flat array, so a layout's expected values are one gather.
        self.offsets: dict[int, int] = {}
        for rank in sorted(self.counts):
            self.offsets[rank] = sum(self.counts[r] for r in self.offsets)
        self.layouts: dict[Hashable, tuple[Sequence[object], Any]] = {}  # `refit.plan.verify`'s, kept with the plan
        self.graph_pools: dict[int, object] = {}  # CUDA graph pools its digest batches share, by stream

    def find(self, rank: int, region: int, offset: int) -> Entry | None:
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
