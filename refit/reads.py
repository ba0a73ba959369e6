"""A plan's reads, built once and kept: its direct reads cut into batches and their READ
jobs, each chunk's jobs into each staging slot, and the engine rows no read writes (padding).

Building them walks every tensor of the plan in Python (a few ms at Llama-3-8B's 291 tensors on a CPU
core) before the first byte can be posted, so a receiver keeps them while the plan, the trainers'
registered regions and the engine tensors stay the same: the refits after the first post their reads
at once.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Mapping, Sequence

import torch

from refit.dtypes import device_of
from refit.plan.assemble import padding
from refit.plan.records import Chunk, DirectRead, Plan
from refit.transport.jobs import ReadJob, direct_job_batches, jobs_for
from refit.types import Region, SourceRecord

# Direct reads go in about this many batches (each at least a chunk). Fewer, larger batches post
# fewer transfers and leave fewer gaps between them; more, smaller ones let chunk reads pass sooner
# and shorten the last batch's digest check on the tail. Two H200s, llama-3-8b TP1 -> TP1 (13.5 GiB
# direct, 4 chunks of 480 MiB): batches of one chunk 51-53 ms, of four chunks (~8 batches) 49-50 ms,
# one batch 57 ms.
DIRECT_BATCHES = 8

Addressing = tuple[tuple[int, str, tuple[Region, ...]], ...]


def addressing(sources: Sequence[SourceRecord]) -> Addressing:
    """What a plan's jobs take from its sources: each rank's agent and registered regions."""
    return tuple((s.rank, s.agent_name, s.regions) for s in sources)


class PreparedReads:
    """The READ jobs of one `plan` from `sources` into its staging slots and the engine tensors `dests`
    (direct reads); a receiver's prefetch and streamed install both take their jobs from here."""

    def __init__(self, plan: Plan, sources: Sequence[SourceRecord], dests: Mapping[str, torch.Tensor]) -> None:
        self.plan = plan
        self.addressing = addressing(sources)
        self._targets = tuple(dict.fromkeys(d.target for d in plan.direct))
        self._sources = tuple(sources)
        self.padding = padding(plan.targets)  # the engine rows no trainer publishes, zeroed each refit
        self.storages = [dests[n] for n in self._targets]  # the engine tensors direct reads write into
        # Each target's (address, device, device id, address of its storage: its registration).
        where = {
            n: (t.data_ptr(), *device_of(t), t.untyped_storage().data_ptr())
            for n, t in zip(self._targets, self.storages, strict=True)
        }
        self._where = tuple(w[0] for w in where.values())  # what `fits` compares
        self.direct_reads: list[list[DirectRead]] = []
        self.batches: list[list[ReadJob]] = []
        if plan.direct:
            # In batches: a chunk's read posted meanwhile waits behind the batches in flight (a peer's
            # transfers run in order), not behind every direct read (`refit.streaming.direct_depth`).
            self.direct_reads = batched(plan.direct, batch_bytes(plan))
            self.batches = direct_job_batches(self.direct_reads, sources, where)
        self._chunks: dict[tuple[int, int], list[ReadJob]] = {}

    def fits(self, plan: Plan, sources: Sequence[SourceRecord], dests: Mapping[str, torch.Tensor]) -> bool:
        """Whether these are `plan`'s jobs from `sources` into `dests`: the same plan, the trainers'
        regions where they were, and every engine tensor a direct read writes where it was."""
        return (
            plan is self.plan
            and addressing(sources) == self.addressing
            and all(n in dests for n in self._targets)
            and _where(self._targets, dests) == self._where
        )

    def chunk(self, k: int, slot: torch.Tensor) -> list[ReadJob]:
        """The READ jobs that fill `slot` with chunk k."""
        key = (k, slot.data_ptr())
        jobs = self._chunks.get(key)
        if jobs is None:
            jobs = self._chunks[key] = chunk_jobs(self.plan.chunks[k], self._sources, slot)
        return jobs


def _where(names: Sequence[str], dests: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    return tuple(dests[n].data_ptr() for n in names)


def chunk_jobs(chunk: Chunk, sources: Sequence[SourceRecord], slot: torch.Tensor) -> list[ReadJob]:
    """The READ jobs that fill `slot` with `chunk`."""
    return jobs_for(chunk, sources, slot.data_ptr(), *device_of(slot))


def chunk_size(plan: Plan) -> int:
    """The bytes of a plan's largest chunk: the size of each staging slot."""
    return max((c.staging_bytes for c in plan.chunks), default=0)


def batch_bytes(plan: Plan) -> int:
    """The size of a batch of direct reads: a DIRECT_BATCHES-th of the direct bytes, at least a chunk; a
    chunk when there are more chunks than that.

    A chunk's pull waits behind the direct batches in flight (a link serves a peer's transfers in
    order), and with many chunks their installs, not the link, bound the refit: the chunk pipeline must
    not stall behind large batches. Two H200s, llama-3-8b TP2 -> TP1 (9 GiB direct, 13 chunks of
    ~480 MiB): chunk-sized batches 30.7 ms without the digest check, 34.7 with it; 8 batches 34.4 / 38.1.
    """
    if len(plan.chunks) > DIRECT_BATCHES:
        return chunk_size(plan)
    return max(chunk_size(plan), -(-plan.direct_bytes // DIRECT_BATCHES))


def batched(reads: Sequence[DirectRead], nbytes: int) -> list[list[DirectRead]]:
    """`reads` cut into batches of about `nbytes` (one batch when `nbytes` is 0: no chunks to yield to).

    Each batch takes from every trainer rank in proportion to what that rank serves, each rank's
    reads in their order, so every rank's link carries every batch (by rank, one link would carry
    the first batches and another the last: a trainer rank on the engine's own GPU is served ~5x
    faster than one across NVLink, and sat idle while the other's batches ran).
    """
    if nbytes <= 0:
        return [list(reads)]
    queues: dict[int, deque[DirectRead]] = defaultdict(deque)
    for r in reads:
        queues[r.rank].append(r)
    total = sum(r.nbytes for r in reads) or 1
    quota = {rank: max(1, nbytes * sum(r.nbytes for r in q) // total) for rank, q in queues.items()}
    out: list[list[DirectRead]] = []
    while any(queues.values()):
        batch: list[DirectRead] = []
        for rank, left in queues.items():
            taken = 0
            while left and (taken == 0 or taken + left[0].nbytes <= quota[rank]):
                taken += left[0].nbytes
                batch.append(left.popleft())
        out.append(batch)
    return out
