"""What a refit moves, as the transport sees it: reads, per-remote jobs, and the merging of ranges.

Pure values and functions (no NIXL, no torch; NIXL's descriptor rows as numpy arrays), so the
translation from a plan to transfers is tested on its own. The plan is taken by shape
(`PlannedRead`), not imported: planning sits below the transport's callers, not below the transport.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from refit.errors import LayoutError
from refit.types import Region, SourceRecord


@dataclass(frozen=True, kw_only=True, slots=True)
class ReadOp:
    """One contiguous (or strided) read: `count` blocks of `nbytes`, each `stride` bytes apart."""

    local_addr: int
    remote_addr: int
    nbytes: int
    count: int = 1
    local_stride: int = 0
    remote_stride: int = 0
    # The remote registered region it reads: two regions may be adjacent in memory (two caching-allocator
    # blocks, e.g. Megatron DDP's bf16 and fp32 param buffers), and NIXL rejects a descriptor spanning both.
    region: int = 0
    # The same for the local side: the registration it writes (a staging slot, or one engine tensor's
    # storage: two engine tensors may be adjacent blocks of the caching allocator too).
    local_region: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ReadJob:
    """Everything to pull from one remote agent (one of its memory kinds) in one refit."""

    agent_name: str
    ops: Sequence[ReadOp]
    local_device: str = "cpu"
    local_device_id: int = 0
    remote_device: str = "cpu"
    remote_device_id: int = 0


class Posted:
    """READs posted in batches (`NixlAgent.post`, or within `read_batches`): each batch's transfers (NIXL
    handles, or `IpcCopy`s for peers copied over CUDA IPC) with
    their jobs and bytes, the descriptors posted, and when posting began (for traces)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[Any, ReadJob, int]]] = []
        self.descriptors = 0
        self._start = time.perf_counter()

    def ms(self) -> float:
        return 1e3 * (time.perf_counter() - self._start)


def merge_reads(ops: Sequence[ReadOp]) -> list[tuple[int, int, int]]:
    """Expand strided ops and merge ranges that are adjacent on both sides and in one region on each side.

    Returns `(local_addr, remote_addr, nbytes)` triples; a fast link pays per descriptor, so a
    sliced plan must not explode into thousands of small reads when its ranges touch. A merged
    range never spans two registered regions, remote or local, even adjacent ones: NIXL would
    reject it (`NIXL_ERR_NOT_FOUND`).
    """
    flat: list[tuple[int, int, int, tuple[int, int]]] = []
    for op in ops:
        regions = (op.region, op.local_region)
        for i in range(op.count):
            local, remote = op.local_addr + i * op.local_stride, op.remote_addr + i * op.remote_stride
            flat.append((local, remote, op.nbytes, regions))
    flat.sort(key=lambda r: r[1])
    merged: list[list] = []
    for local, remote, n, regions in flat:
        if n <= 0:
            continue
        if merged:
            last = merged[-1]
            if last[0] + last[2] == local and last[1] + last[2] == remote and last[3] == regions:
                last[2] += n
                continue
        merged.append([local, remote, n, regions])
    return [(a, b, c) for a, b, c, _ in merged]


def descriptor_rows(job: ReadJob) -> tuple[np.ndarray, np.ndarray] | None:
    """`job`'s merged ranges as NIXL descriptor rows, (address, bytes, device id) each: the local
    side's and the remote side's (None: no bytes)."""
    ranges = merge_reads(job.ops)
    if not ranges:
        return None
    arr = np.asarray(ranges, dtype=np.uint64)
    n = len(arr)
    local = np.stack([arr[:, 0], arr[:, 2], np.full(n, job.local_device_id, np.uint64)], axis=1)
    remote = np.stack([arr[:, 1], arr[:, 2], np.full(n, job.remote_device_id, np.uint64)], axis=1)
    return local, remote


class PlannedRead(Protocol):
    """One read of a plan (`refit.plan.planner.Read`): `count` blocks of `block_bytes` from a trainer region."""

    @property
    def rank(self) -> int: ...
    @property
    def region(self) -> int: ...
    @property
    def remote_offset(self) -> int: ...
    @property
    def local_offset(self) -> int: ...
    @property
    def block_bytes(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def remote_stride(self) -> int: ...


class PlanReads(Protocol):
    """What `jobs_for` needs of a plan (`refit.plan.planner.Plan`)."""

    @property
    def reads(self) -> Sequence[PlannedRead]: ...


def jobs_for(
    plan: PlanReads,
    sources: Mapping[int, SourceRecord] | Iterable[SourceRecord],
    staging_addr: int,
    local_device: str,
    local_device_id: int,
) -> list[ReadJob]:
    """The READ jobs of `plan`: one per (trainer rank, remote device), ordered by rank then device.

    Each planned read becomes one `ReadOp` from its region's address into the staging buffer at
    `staging_addr`; the staged blocks of a read are packed (local stride = block size).
    """
    ops = [
        (r.rank, r.region, r.remote_offset, staging_addr + r.local_offset, r.block_bytes, r.count, r.remote_stride)
        for r in plan.reads
    ]
    return _group(ops, _index(sources), lambda _: (local_device, local_device_id, 0))  # one registration: the slot


class PlannedDirect(Protocol):
    """A direct read of a plan (`refit.plan.records.DirectRead`): one engine tensor, whole."""

    @property
    def target(self) -> str: ...
    @property
    def rank(self) -> int: ...
    @property
    def region(self) -> int: ...
    @property
    def remote_offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def offset(self) -> int: ...


def direct_jobs(
    reads: Iterable[PlannedDirect],
    sources: Mapping[int, SourceRecord] | Iterable[SourceRecord],
    destinations: Mapping[str, tuple[int, str, int, int]],
) -> list[ReadJob]:
    """The READ jobs that land each direct read in its engine tensor: `destinations` maps the target
    to its (address, device, device id, address of its storage: the registration it lies in); a read
    lands `offset` bytes into it."""
    return direct_job_batches([reads], sources, destinations)[0]


def direct_job_batches(
    batches: Iterable[Iterable[PlannedDirect]],
    sources: Mapping[int, SourceRecord] | Iterable[SourceRecord],
    destinations: Mapping[str, tuple[int, str, int, int]],
) -> list[list[ReadJob]]:
    """`direct_jobs` of each batch, the sources indexed once (a plan can hold hundreds of batches)."""
    index = _index(sources)
    out = []
    for batch in batches:
        reads = list(batch)
        ops = [(r.rank, r.region, r.remote_offset, destinations[r.target][0] + r.offset, r.nbytes, 1, 0) for r in reads]
        where = {destinations[r.target][0] + r.offset: destinations[r.target][1:] for r in reads}
        out.append(_group(ops, index, where.__getitem__))
    return out


_Index = tuple[dict[int, SourceRecord], dict[tuple[int, int], Region]]


def _index(sources: Mapping[int, SourceRecord] | Iterable[SourceRecord]) -> _Index:
    """Sources by rank, and their regions by (rank, index)."""
    records = sources.values() if isinstance(sources, Mapping) else sources
    by_rank = {s.rank: s for s in records}
    return by_rank, {(s.rank, g.index): g for s in by_rank.values() for g in s.regions}


def _group(
    ops: Iterable[tuple[int, int, int, int, int, int, int]],
    index: _Index,
    local: Callable[[int], tuple[str, int, int]],
) -> list[ReadJob]:
    """(rank, region, remote offset, local address, block bytes, count, remote stride) reads as
    jobs, one per (trainer rank, remote device, local device); `local` gives an address's device,
    device id and local registration."""
    by_rank, regions = index
    groups: dict[tuple[int, str, int, str, int], list[ReadOp]] = defaultdict(list)
    for rank, index, remote_offset, local_addr, block, count, stride in ops:
        region = regions.get((rank, index))
        if region is None:
            # The planner only plans from the records it was given: a plan paired with other sources.
            raise LayoutError(f"the plan reads region {index} of rank {rank}, which the sources do not have")
        local_device, local_device_id, local_region = local(local_addr)
        groups[(rank, region.device, region.device_id, local_device, local_device_id)].append(
            ReadOp(
                local_addr=local_addr,
                remote_addr=region.addr + remote_offset,
                nbytes=block,
                count=count,
                local_stride=block,
                remote_stride=stride,
                region=index,
                local_region=local_region,
            )
        )
    return [
        ReadJob(
            agent_name=by_rank[rank].agent_name,
            ops=ops,
            local_device=local_device,
            local_device_id=local_device_id,
            remote_device=device,
            remote_device_id=device_id,
        )
        for (rank, device, device_id, local_device, local_device_id), ops in sorted(groups.items())
    ]
