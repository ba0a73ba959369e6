"""Trainer ranks on this host, read with copies this process enqueues itself over CUDA IPC.

A trainer rank publishes, with each GPU region, the IPC handle of the allocation that holds it, and
its host's identity (`refit.transport.host.host_id`). A receiver on the same host maps each
allocation once, kept while the rank's regions stay, and reads a job's ranges with `cudaMemcpyAsync`
over a few kept streams of its GPU (strided reads as one `cudaMemcpy2DAsync`). There is no NIXL post,
no progress thread and no notification to poll: a job's copies end with an event on each stream they
use, and `IpcCopy.state()` queries those. The copies are the ones UCX's `cuda_ipc` transport would enqueue,
without its per-descriptor bookkeeping (~10 us each on an H200, `bench/scripts/post_cost.py`).
A peer mapped on this process's own GPU is also handed out as tensors over its regions (`views`),
which a receiver's kernels copy pieces out of directly where they would otherwise stage them.

Version safety does not change: the trainers' version words are read after the copies have landed,
as after any other pull (from their shared page on this host, `refit.transport.host`). Where a
handle cannot be mapped (another container's IPC namespace, memory without a handle), the rank is
read over NIXL instead, and the reason is logged once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from refit.compat import cuda
from refit.errors import TransportError
from refit.transport.host import host_id
from refit.transport.jobs import ReadJob, ReadOp, merge_reads
from refit.types import Region, SourceRecord

logger = logging.getLogger(__name__)

__all__ = ["Exports", "IpcCopy", "LocalPeers"]

# The most jobs whose copies are kept (a streamed refit of Llama-3-8B has ~70).
_KEPT_JOBS = 4096
# Copies go round-robin over this many streams: on one stream each copy's tail leaves the GPU idle
# before the next starts. One H200, 8 GiB out of another process in 99 copies: 4.62 ms on one
# stream, 4.37 on two, 4.23 on four, against 4.06 as one copy (`bench/scripts/ipc_copy.py`).
STREAMS = 4


class Exports:
    """A trainer rank's side: the CUDA IPC handle of each GPU region it publishes, asked at every publish
    (a handle names an allocation, and an offload or `empty_cache` may put a new one at the same address)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.host = host_id()
        self._warned = False  # about regions without a handle, once

    def regions(self, regions: Sequence[Region]) -> list[Region]:
        """`regions`, each GPU one with its handle where it has one."""
        gpu = [r for r in regions if r.device == "cuda"]
        if not self.enabled or not gpu:
            return list(regions)
        try:
            exported = iter(cuda.export([(r.addr, r.device_id) for r in gpu]))
        except TransportError as exc:  # no CUDA runtime to ask: NIXL alone serves this rank
            logger.warning("no CUDA IPC handles are published: %s", exc)
            self.enabled = False
            return list(regions)
        out = []
        for r in regions:
            handle = next(exported) if r.device == "cuda" else None
            out.append(r if handle is None else dataclasses.replace(r, ipc_handle=handle[0], ipc_offset=handle[1]))
        missing = sum(1 for r in out if r.device == "cuda" and not r.ipc_handle)
        if missing and not self._warned:
            self._warned = True
            logger.warning(
                "%d of %d GPU region(s) have no CUDA IPC handle (memory from torch's expandable segments or "
                "cudaMallocAsync); receivers on this host read this rank over NIXL, not by copies of their own. "
                "PYTORCH_CUDA_ALLOC_CONF without expandable_segments:True gives every region a handle",
                missing, len(gpu),
            )  # fmt: skip
        return out


class IpcCopy:
    """One job's copies, enqueued; `state()` is "DONE" once they have run, "PROC" before (NIXL's words)."""

    __slots__ = ("agent_name", "descriptors", "events", "nbytes")

    def __init__(self, agent_name: str, events: list[torch.cuda.Event], descriptors: int, nbytes: int) -> None:
        self.agent_name, self.events, self.descriptors, self.nbytes = agent_name, events, descriptors, nbytes

    def state(self) -> str:
        try:
            while self.events and self.events[-1].query():
                self.events.pop()
            return "PROC" if self.events else "DONE"
        except RuntimeError as exc:  # an asynchronous CUDA error surfaces at the next query
            name = self.agent_name
            raise TransportError(f"copies from {name} over CUDA IPC failed: {exc}", agent_name=name) from exc


# (dst, src, bytes) or (dst, dst pitch, src, src pitch, width, rows)
_Copy = tuple[int, int, int] | tuple[int, int, int, int, int, int]


@dataclass(frozen=True, kw_only=True, slots=True)
class _Peer:
    regions: tuple[Region, ...]  # the GPU regions mapped
    local: dict[int, int]  # region index -> where its first byte is mapped in this process
    handles: tuple[bytes, ...]
    published: tuple[Region, ...] = ()  # every region of the record mapped (kept while it stays the same)


class LocalPeers:
    """The trainer ranks on this host whose GPU regions this process maps and copies out of itself.

    Args:
        device: the GPU (index) the copies are enqueued on: the engine's.
    """

    def __init__(self, device: int) -> None:
        self.device = device
        self.host = host_id()
        self.enabled = True  # False: every job goes over NIXL (refit-bench alternates the two)
        self.copies = 0  # descriptors posted as copies, for stats
        self._peers: dict[str, _Peer] = {}
        self._refused: dict[str, tuple[Region, ...]] = {}  # regions that could not be mapped, logged once
        self._maps: dict[bytes, tuple[int, int, int]] = {}  # handle -> (base, bytes, peers using it)
        self._jobs: dict[int, tuple[ReadJob, _Peer, list[_Copy], int]] = {}
        self._views: dict[str, tuple[_Peer, dict[int, torch.Tensor] | None]] = {}
        self._streams: list[torch.cuda.Stream] = []
        self._load = [0] * STREAMS  # bytes enqueued on each stream, less the least of them
        self._lock = threading.RLock()

    def add(self, source: SourceRecord) -> bool:
        """Map `source`'s GPU regions if it is on this host and every one has a handle (kept while its
        regions stay the same); whether its GPU jobs are copied here from now on."""
        name = source.agent_name
        with self._lock:
            peer = self._peers.get(name)
            if peer is not None and peer.published == source.regions:
                return True
            gpu = [r for r in source.regions if r.device == "cuda"]
            if source.host != self.host or not gpu or not all(r.ipc_handle for r in gpu):
                self._drop(name)
                if source.host == self.host and gpu and self._refused.get(name) != source.regions:
                    self._refused[name] = source.regions  # said once while its regions stay the same
                    missing = sum(not r.ipc_handle for r in gpu)
                    logger.info("%s: %d of its %d GPU region(s) on this host carry no CUDA IPC handle (its publisher "
                                "says why); reading it over NIXL", name, missing, len(gpu))  # fmt: skip
                return False
            if self._refused.get(name) == source.regions:
                return False
            self._drop(name)
            try:
                self._peers[name] = dataclasses.replace(self._map(gpu), published=source.regions)
            except TransportError as exc:
                self._refused[name] = source.regions
                logger.warning(
                    "%s: its GPU memory cannot be mapped over CUDA IPC (%s); reading it over NIXL", name, exc
                )
                return False
        logger.info("%s: %d GPU region(s) mapped over CUDA IPC", name, len(gpu))
        return True

    def retain(self, names: Collection[str]) -> None:
        """Unmap the peers whose agents are not in `names` (those of the version being pulled): a trainer
        rank that restarted under a new agent, or left, must not stay mapped here, since a mapping keeps
        the memory it maps allocated on the GPU."""
        with self._lock:
            for name in [n for n in self._peers if n not in names]:
                logger.info("%s: no longer a source; its GPU memory is unmapped", name)
                self._drop(name)
            for name in [n for n in self._refused if n not in names]:
                del self._refused[name]

    def covers(self, sources: Sequence[SourceRecord]) -> bool:
        """Whether every byte of `sources` would be copied here: enabled, and each source on this host
        with only GPU regions, every one with a handle (and not refused before)."""
        return self.enabled and bool(sources) and all(self._mappable(s) for s in sources)

    def _mappable(self, s: SourceRecord) -> bool:
        return (
            s.host == self.host
            and bool(s.regions)
            and all(r.device == "cuda" and r.ipc_handle for r in s.regions)
            and self._refused.get(s.agent_name) != s.regions
        )

    def owns(self, job: ReadJob) -> bool:
        """Whether `job` is copied here: enabled, GPU to GPU, from a mapped peer."""
        return self.enabled and job.remote_device == job.local_device == "cuda" and job.agent_name in self._peers

    def post(self, job: ReadJob) -> IpcCopy:
        """Enqueue `job`'s copies over the kept streams; its events say when they have run."""
        with self._lock:  # direct batches and chunks may be posted from several threads
            peer = self._peers.get(job.agent_name)
            if peer is None:  # unmapped since `owns` (a `retain` of another thread)
                raise TransportError(f"{job.agent_name} is no longer mapped here", agent_name=job.agent_name)
            hit = self._jobs.get(id(job))
            if hit is None or hit[0] is not job or hit[1] is not peer:
                if len(self._jobs) >= _KEPT_JOBS:
                    self._jobs.clear()
                copies = sorted(_copies(job, peer), key=_size, reverse=True)
                hit = self._jobs[id(job)] = (job, peer, copies, sum(map(_size, copies)))
            _, _, copies, nbytes = hit
            streams = self._kept_streams()
            used: dict[int, torch.cuda.Stream] = {}
            load = self._load
            with cuda.on_device(self.device):
                try:
                    for c in copies:  # largest first, each onto the stream with the fewest bytes enqueued
                        k = load.index(min(load))
                        load[k] += _size(c)
                        used[k] = streams[k]
                        if len(c) == 3:
                            cuda.copy(c[0], c[1], c[2], streams[k].cuda_stream)
                        else:
                            cuda.copy_strided(*c, streams[k].cuda_stream)
                except BaseException:
                    for stream in used.values():  # no event will say when these end: none may run after this
                        stream.synchronize()
                    raise
            least = min(load)
            self._load = [n - least for n in load]
            events = []
            for stream in used.values():
                events.append(torch.cuda.Event())
                events[-1].record(stream)
            self.copies += len(copies)
        return IpcCopy(job.agent_name, events, len(copies), nbytes)

    def views(self, name: str) -> dict[int, torch.Tensor] | None:
        """Each GPU region of peer `name` as a flat uint8 tensor over its mapping here (by region index),
        for this process's kernels to copy out of; None unless it is mapped and all of it is on this
        process's GPU (a kernel reading another GPU's memory runs over the link at the kernel's pace:
        there the copy engines read it). Kept while the peer stays mapped; dropped with it."""
        with self._lock:
            peer = self._peers.get(name)
            if peer is None or not self.enabled:
                return None
            hit = self._views.get(name)
            if hit is not None and hit[0] is peer:
                return hit[1]
            views: dict[int, torch.Tensor] | None = None
            try:
                if all(cuda.device_of(peer.local[r.index]) == self.device for r in peer.regions):
                    views = {r.index: cuda.tensor_at(peer.local[r.index], r.nbytes, self.device) for r in peer.regions}
            except (TransportError, RuntimeError) as exc:  # torch refuses the range: copies read it instead
                logger.warning("%s: its mapped GPU memory cannot be read by kernels here (%s)", name, exc)
            self._views[name] = (peer, views)
            return views

    def _kept_streams(self) -> list[torch.cuda.Stream]:
        if not self._streams:
            self._streams = [torch.cuda.Stream(device=self.device) for _ in range(STREAMS)]
        return self._streams

    def _map(self, regions: list[Region]) -> _Peer:
        local: dict[int, int] = {}
        opened: list[bytes] = []
        try:
            for r in regions:
                mapped = self._maps.get(r.ipc_handle)
                if mapped is None:
                    base, size = cuda.open_handle(r.ipc_handle, self.device)
                    mapped = (base, size, 0)
                self._maps[r.ipc_handle] = (mapped[0], mapped[1], mapped[2] + 1)
                opened.append(r.ipc_handle)
                if r.ipc_offset + r.nbytes > mapped[1]:
                    raise TransportError(
                        f"region {r.index} ({r.nbytes} bytes at offset {r.ipc_offset}) runs past the end of its "
                        f"mapped allocation ({mapped[1]} bytes)"
                    )
                local[r.index] = mapped[0] + r.ipc_offset
        except BaseException:
            for handle in opened:
                self._unref(handle)
            raise
        return _Peer(regions=tuple(regions), local=local, handles=tuple(opened))

    def _drop(self, name: str) -> None:
        peer = self._peers.pop(name, None)
        self._views.pop(name, None)
        if peer is None:
            return
        # Nothing may still copy out of what is unmapped: this class's copies, nor kernels reading `views`
        # (without CUDA initialized in this process, nothing ran at all).
        if torch.cuda.is_initialized():
            torch.cuda.synchronize(self.device)
        for handle in peer.handles:
            self._unref(handle)

    def _unref(self, handle: bytes) -> None:
        base, size, refs = self._maps[handle]
        if refs > 1:
            self._maps[handle] = (base, size, refs - 1)
            return
        del self._maps[handle]
        try:
            cuda.close_handle(base, self.device)
        except TransportError:
            logger.warning("closing a CUDA IPC mapping failed", exc_info=True)

    def close(self) -> None:
        """Unmap every peer once the copies enqueued have run."""
        with self._lock:
            for name in list(self._peers):
                self._drop(name)
            self._jobs.clear()


def _size(c: _Copy) -> int:
    return c[2] if len(c) == 3 else c[4] * c[5]


def _copies(job: ReadJob, peer: _Peer) -> list[_Copy]:
    """`job`'s ranges as copies from the mapped regions: contiguous ones merged where both sides touch."""
    flat: list[ReadOp] = []  # with the mapped source address, merged as NIXL descriptors are
    strided: list[_Copy] = []
    regions = {r.index: r for r in peer.regions}
    for op in job.ops:
        region = regions.get(op.region)
        if region is None:
            raise TransportError(f"a read names region {op.region} of {job.agent_name}, which is not mapped")
        if op.nbytes < 0 or op.count < 0 or op.remote_stride < 0:
            raise TransportError(f"a read of {job.agent_name} has a negative size, count or stride: {op}")
        if op.nbytes == 0 or op.count == 0:
            continue
        end = op.remote_addr + (op.count - 1) * op.remote_stride + op.nbytes
        if op.remote_addr < region.addr or end > region.addr + region.nbytes:
            raise TransportError(
                f"a read of {job.agent_name} runs outside its region {op.region} ({op.count} x {op.nbytes} bytes "
                f"at {op.remote_addr:#x}; the region is {region.nbytes} bytes at {region.addr:#x})",
                agent_name=job.agent_name,
            )
        src = peer.local[op.region] + (op.remote_addr - region.addr)
        if op.count > 1 and op.local_stride >= op.nbytes and op.remote_stride >= op.nbytes:
            strided.append((op.local_addr, op.local_stride, src, op.remote_stride, op.nbytes, op.count))
        else:
            # `merge_reads` keeps to one region on each side: two mappings (or two engine tensors) may
            # sit side by side in this process, and one copy must not run from one into the other.
            flat.append(dataclasses.replace(op, remote_addr=src))
    return [*merge_reads(flat), *strided]
