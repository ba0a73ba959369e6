"""A receiver's registered memory and the pulls into it: staging buffers, set-aside buffers of
failed reads, the engine storages that direct reads write into (the streamed install that runs on
them is `refit.streaming`).

Staging is one buffer per slot (one slot when a refit fits the window; `Plan.slots` when chunks
stream, the next ones pulled while one is installed), registered once and reused by every later
refit. A read that fails or times out may leave transfers running into its buffers, so those are set aside
(quarantined) and freed only once no transfer is still running; the next refit gets fresh ones.
Engine storages are registered the first time a direct read targets them and stay registered.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from refit.config import MIN_WAIT_S
from refit.copies import ChunkCopier
from refit.dtypes import device_of
from refit.errors import TransportError
from refit.plan.assemble import mirrored_groups
from refit.plan.records import Piece, Plan
from refit.reads import PreparedReads, chunk_size
from refit.transport.host import WordReader
from refit.transport.jobs import ReadJob, ReadOp
from refit.transport.nixl import NixlAgent, Posted
from refit.types import SourceRecord

logger = logging.getLogger(__name__)

# The trainers' regions mapped in this process, by (rank, region index): what chunks are copied out of
# instead of a slot (`StagingPool.mapped_regions`).
Mapped = dict[tuple[int, int], torch.Tensor]

# Staging buffers a closed receiver could not free: a failed read may still write into them.
_PARKED: list[torch.Tensor] = []


class StagingPool:
    """Registered staging slots and engine storages of one receiver, on one NIXL agent."""

    def __init__(self, agent: NixlAgent, label: str) -> None:
        self.agent = agent
        self._label = label
        self._slots: list[torch.Tensor | None] = []
        self._quarantine: list[torch.Tensor] = []
        self._engine: dict[tuple[int, int], tuple[str, int]] = {}  # (addr, nbytes) -> device
        self.registrations = 0
        self.quarantined = 0
        self.peak_bytes = 0
        self.mapped_chunks = 0  # chunks installed out of mapped regions instead of a slot, for stats
        self.checked_copies = 0  # direct batches copied out of mapped regions and digested at once, for stats
        self._executor: ThreadPoolExecutor | None = None
        self._workers = 0
        self._streams: dict[str, torch.cuda.Stream] = {}  # kept side streams, by use
        # Kept for the plan of the last refit (`_kept_for`): (chunk index, out of mapped regions) -> its
        # copies; chunk index -> its pieces `mirrored`; the (rank, region)s its staged pieces and its
        # direct reads come from.
        self._kept_plan: Plan | None = None
        self._copiers: dict[tuple[int, bool], ChunkCopier] = {}
        self._mirrored: dict[int, list[tuple[tuple[int, int], tuple[Piece, ...]]]] = {}
        self._staged_regions: frozenset[tuple[int, int]] = frozenset()
        self._direct_regions: frozenset[tuple[int, int]] = frozenset()
        # Whether every direct batch of the kept plan is copied and checked in one pass, for a key of what
        # that depends on (`refit.streaming`).
        self.checked: tuple[tuple[object, ...], bool] | None = None
        self._reads: PreparedReads | None = None  # the last streamed plan's reads, for the next refit
        self._words: torch.Tensor | None = None  # where the trainers' version words are read into
        self._word_jobs: dict[tuple[str, int, int], ReadJob] = {}
        self.word_reader = WordReader()  # the words of trainer ranks on this host, from their shared pages

    @property
    def staging_bytes(self) -> int:
        return sum(s.numel() for s in self._slots if s is not None)

    @property
    def quarantined_bytes(self) -> int:
        return sum(t.numel() for t in self._quarantine)

    @property
    def label(self) -> str:
        return self._label

    def executor(self, slots: int) -> ThreadPoolExecutor:
        """Pull workers, made on first use: one per staging slot (each may have a pull in flight) and
        one for the direct reads."""
        workers = slots + 1
        if self._executor is not None and self._workers < workers:
            self._executor.shutdown(wait=True)  # between refits: nothing is in flight on it
            self._executor = None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"refit-pull-{self._label}")
            self._workers = workers
        return self._executor

    def slots(self, count: int, nbytes: int, device: torch.device) -> list[torch.Tensor]:
        """`count` registered buffers of at least `nbytes` each on `device`, reused while large enough.

        Slots beyond `count` are released, so the staging held is what this refit needs.
        """
        self.release_quarantine()
        while len(self._slots) > count:
            extra = self._slots.pop()
            if extra is not None:
                self._deregister(extra)
        while len(self._slots) < count:
            self._slots.append(None)
        for i, slot in enumerate(self._slots):
            if slot is not None and slot.numel() >= nbytes and slot.device == device:
                continue
            if slot is not None:
                self._deregister(slot)
                self._slots[i] = None
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            where, where_id = device_of(buf)
            self.agent.register(buf.data_ptr(), buf.numel(), device=where, device_id=where_id)
            self._slots[i] = buf
            self.registrations += 1
        self.peak_bytes = max(self.peak_bytes, self.staging_bytes)
        return [s for s in self._slots if s is not None]

    def register_engine(self, storages: Iterable[torch.Tensor]) -> None:
        """Register (once) the storages of engine tensors that direct reads write into."""
        for t in storages:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key in self._engine:
                continue
            where, where_id = device_of(t)
            self.agent.register(key[0], key[1], device=where, device_id=where_id)
            self._engine[key] = (where, where_id)
            self.registrations += 1

    # -- pulls ---------------------------------------------------------------------------------------

    def connect(self, sources: Sequence[SourceRecord], jobs: Sequence[ReadJob]) -> None:
        """Connect the agents `jobs` read from; those on this host are mapped over CUDA IPC too."""
        by_name = {s.agent_name: s for s in sources}
        local = self.agent.local
        for agent_name in dict.fromkeys(j.agent_name for j in jobs):
            self.agent.connect(agent_name, by_name[agent_name].agent_metadata)
            if local is not None and local.enabled:
                local.add(by_name[agent_name])

    def read(self, jobs: list[ReadJob], deadline: float) -> int:
        """Pull `jobs`; after a failure staging is set aside (a transfer that did not stop may still write)."""
        return self.read_batches([jobs], deadline)

    def read_batches(
        self,
        batches: list[list[ReadJob]],
        deadline: float,
        landed: Callable[[int], None] | None = None,
        *,
        depth: int = 2,
    ) -> int:
        """`read` of `batches` in order, `depth` in flight at a time; `landed(k)` once batch k is in."""
        with self._set_aside_on_failure():
            timeout_s = max(deadline - time.monotonic(), MIN_WAIT_S)
            return self.agent.read_batches(batches, depth=depth, timeout_s=timeout_s, landed=landed)

    def post(self, batches: list[list[ReadJob]]) -> Posted:
        """Post every batch of reads now, all in flight at once (`NixlAgent.post`); `land` waits for them."""
        with self._set_aside_on_failure():
            return self.agent.post(batches)

    def land(self, posted: Posted, deadline: float, landed: Callable[[int], None] | None = None) -> int:
        """Wait for `posted` reads, `landed(k)` once batch k is in, as `read_batches`."""
        with self._set_aside_on_failure():
            return self.agent.land(posted, timeout_s=max(deadline - time.monotonic(), MIN_WAIT_S), landed=landed)

    @contextlib.contextmanager
    def _set_aside_on_failure(self) -> Iterator[None]:
        """After a failed read staging is set aside: a transfer that did not stop may still write it."""
        try:
            yield
        except BaseException:
            self.quarantine()
            raise

    def prefetch(
        self,
        plan: Plan,
        sources: Sequence[SourceRecord],
        deadline: float,
        device: torch.device,
        *,
        chunks: int,
        dests: Mapping[str, torch.Tensor] | None = None,
        mapped: bool = False,
    ) -> tuple[int, int, list[torch.Tensor], Mapped | None]:
        """Allocate the plan's slots (`Plan.slot_count`) and pull its first `chunks` chunks, at
        most as many as there are slots unless the plan is a single chunk. Their jobs are the kept
        reads of the plan (`reads`; `dests`: the engine tensors its direct reads write into). With
        `mapped`, where every staged piece's trainer region is mapped on the engine's GPU
        (`mapped_regions`), the install copies the chunks past the first `chunks` out of them; with
        `chunks` 0, no slot is allocated at all.

        Returns (chunks pulled, descriptors posted, slots, the mapped regions or None).
        """
        regions = self.mapped_regions(plan, sources) if mapped else None
        if regions is not None and chunks == 0:
            return 0, 0, [], regions
        count = plan.slot_count
        slots = self.slots(count, chunk_size(plan), device)
        reads = self.reads(plan, sources, dests or {})
        first = range(min(chunks, count, len(plan.chunks)))
        jobs = [j for k in first for j in reads.chunk(k, slots[k % len(slots)])]
        self.connect(sources, jobs)
        return len(first), self.read(jobs, deadline) if jobs else 0, slots, regions

    def mapped_regions(self, plan: Plan, sources: Sequence[SourceRecord]) -> Mapped | None:
        """The trainer regions `plan`'s staged pieces come from, by (rank, region index), each a tensor
        over its mapping in this process (`LocalPeers.views`): where every one is of a trainer rank on
        this host mapped over CUDA IPC, on the engine's own GPU. None otherwise, or without staged pieces.

        Copied out of there by kernels (un-interleaving QKV, say), staged pieces cross the GPU's memory
        once instead of three times (into a slot, out of it, into the engine), and need no staging.
        """
        if not plan.pieces:
            return None
        self._kept_for(plan)
        return self._mapped(self._staged_regions, sources)

    def direct_regions(self, plan: Plan, sources: Sequence[SourceRecord]) -> Mapped | None:
        """The trainer regions `plan`'s direct reads come from, mapped on the engine's GPU, as
        `mapped_regions` (what a receiver's kernels copy them out of, digesting them in the same pass)."""
        if not plan.direct:
            return None
        self._kept_for(plan)
        return self._mapped(self._direct_regions, sources)

    def _mapped(self, needed: frozenset[tuple[int, int]], sources: Sequence[SourceRecord]) -> Mapped | None:
        """Views over the mappings of the (rank, region)s `needed`; None unless every one is on this GPU."""
        local = self.agent.local
        if local is None or not local.enabled:
            return None
        ranks = {rank for rank, _ in needed}
        out: Mapped = {}
        for s in sources:
            if s.rank in ranks:
                views = local.views(s.agent_name) if local.add(s) else None
                if views is None:
                    return None
                out.update(((s.rank, index), v) for index, v in views.items())
        return out if needed <= out.keys() else None

    def read_words(self, sources: Sequence[SourceRecord], deadline: float) -> list[int]:
        """Each source's version word (`SourceRecord.fence_addr`, `refit.trainer.fence`), read now: from
        its shared page for a source on this host (`refit.transport.host`), else over NIXL into a kept
        registered host buffer, one 8-byte READ per source."""
        reader = self.word_reader
        mapped = [reader.can_read(s.host, s.fence_shm) for s in sources]
        remote = [s for s, m in zip(sources, mapped, strict=True) if not m]
        over_nixl = iter(self._read_words_over_nixl(remote, deadline) if remote else ())
        return [
            reader.read(s.fence_shm, s.fence_addr) if m else next(over_nixl)
            for s, m in zip(sources, mapped, strict=True)
        ]

    def _read_words_over_nixl(self, sources: Sequence[SourceRecord], deadline: float) -> list[int]:
        if self._words is None or self._words.numel() < len(sources):
            if self._words is not None:
                self.agent.deregister(self._words.data_ptr(), self._words.numel() * 8)
            self._words = torch.empty(max(len(sources), 8), dtype=torch.int64)
            self.agent.register(self._words.data_ptr(), self._words.numel() * 8)
            self._word_jobs = {}
        base = self._words.data_ptr()
        jobs = []
        for i, s in enumerate(sources):
            key = (s.agent_name, s.fence_addr, base + 8 * i)
            job = self._word_jobs.get(key)
            if job is None:
                job = self._word_jobs[key] = ReadJob(
                    agent_name=s.agent_name, ops=(ReadOp(local_addr=key[2], remote_addr=s.fence_addr, nbytes=8),)
                )
            jobs.append(job)
        self.connect(sources, jobs)
        try:
            self.agent.read(jobs, timeout_s=max(deadline - time.monotonic(), MIN_WAIT_S))
        except BaseException:
            # A READ that failed may still land: its buffer is never reused nor freed.
            _PARKED.append(self._words)
            self._words, self._word_jobs = None, {}
            raise
        return self._words[: len(sources)].tolist()

    def reads(self, plan: Plan, sources: Sequence[SourceRecord], dests: Mapping[str, torch.Tensor]) -> PreparedReads:
        """`plan`'s READ jobs from `sources` into staging and `dests`, kept while they still fit; the
        engine storages its direct reads write into are registered when they are first built."""
        reads = self._reads
        if reads is None or not reads.fits(plan, sources, dests):
            reads = PreparedReads(plan, sources, dests)
            self.register_engine(reads.storages)
            self._reads = reads
        return reads

    def copier(self, plan: Plan, k: int, slot: torch.Tensor | Mapped, dests: Mapping[str, torch.Tensor]) -> ChunkCopier:
        """Chunk k's copies out of `slot` (or the mapped regions) into `dests`, built once per plan and
        kept while valid."""
        self._kept_for(plan)
        key = (k, not isinstance(slot, torch.Tensor))
        copier = self._copiers.get(key)
        if copier is None or not copier.valid(slot, dests):
            copier = self._copiers[key] = ChunkCopier(plan, k, slot, dests)
        return copier

    def mirrored(self, plan: Plan, k: int) -> list[tuple[tuple[int, int], tuple[Piece, ...]]]:
        """Chunk k's pieces as their trainers lay them out, by (rank, region) (`mirrored_groups`): what
        the digest check of a chunk copied out of mapped regions reads there. Kept with the plan, as
        the check keeps its layouts by these pieces' identity."""
        self._kept_for(plan)
        groups = self._mirrored.get(k)
        if groups is None:
            groups = self._mirrored[k] = mirrored_groups(plan.chunks[k].pieces)
        return groups

    def _kept_for(self, plan: Plan) -> None:
        """What is kept per plan (copies, mirrored pieces, staged regions) made anew for a new `plan`."""
        if plan is not self._kept_plan:
            self._kept_plan, self._copiers, self._mirrored = plan, {}, {}
            self._staged_regions = frozenset((p.rank, p.region) for p in plan.pieces)
            self._direct_regions = frozenset((d.rank, d.region) for d in plan.direct)
            self.checked = None

    def copy_stream(self, t: torch.Tensor) -> torch.cuda.Stream | None:
        """The kept stream that copies (and checks) staged chunks on `t`'s GPU; None on the CPU."""
        return self._kept_stream("copies", t)

    def check_stream(self, t: torch.Tensor, i: int = 0) -> torch.cuda.Stream | None:
        """The kept stream that checks direct reads on `t`'s GPU, so chunk copies never wait behind them
        (`i` > 0: another such stream, for work that takes turns on several)."""
        return self._kept_stream(f"checks{i}" if i else "checks", t)

    def _kept_stream(self, kind: str, t: torch.Tensor) -> torch.cuda.Stream | None:
        if not t.is_cuda:
            return None
        stream = self._streams.get(kind)
        if stream is None or stream.device != t.device:
            stream = self._streams[kind] = torch.cuda.Stream(device=t.device)
        return stream

    def slots_of(self, plan: Plan) -> list[torch.Tensor]:
        held = [s for s in self._slots if s is not None]
        if len(held) != plan.slot_count or any(s.numel() < chunk_size(plan) for s in held):
            raise TransportError("the staging of this refit was replaced by a later fetch; fetch again")
        return held

    def quarantine(self) -> None:
        """Set every slot aside after a failed read: a transfer NIXL could not stop may still write into it.

        The buffers stay allocated and registered until every transfer of the failed read has ended
        (freed earlier, their memory could be reused and take the late bytes).
        """
        held = [s for s in self._slots if s is not None]
        self._slots = []
        if not held:
            return
        self._quarantine.extend(held)
        self.quarantined += len(held)
        logger.warning("%s: a read failed; %d staging bytes are set aside", self._label, sum(s.numel() for s in held))
        self.release_quarantine()

    def release_quarantine(self) -> None:
        """Free the set-aside buffers once no transfer of a failed read is still running."""
        if not self._quarantine or self.agent.in_flight():
            return
        for staging in self._quarantine:
            self._deregister(staging)
        self._quarantine.clear()

    def _deregister(self, staging: torch.Tensor) -> None:
        where, where_id = device_of(staging)
        try:
            self.agent.deregister(staging.data_ptr(), staging.numel(), device=where, device_id=where_id)
        except Exception:  # the buffer is dropped either way; NIXL frees its registration with the agent
            logger.warning("%s: deregistering a staging buffer failed", self._label, exc_info=True)

    def close(self) -> None:
        """Drop every buffer and close the agent; buffers a failed read may still write stay parked."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.release_quarantine()
        if self._quarantine:
            # Closing the agent cannot stop those transfers either: keep their memory out of reuse.
            logger.warning("%s: a failed read is still running; its staging stays allocated", self._label)
            _PARKED.extend(self._quarantine)
        self.agent.close()
        self._quarantine.clear()
        self._slots = []
        self._engine.clear()
        self._kept_plan, self._copiers, self._mirrored, self.checked = None, {}, {}, None
        self._staged_regions = self._direct_regions = frozenset()
        self._reads = None
        self._words, self._word_jobs = None, {}
        self.word_reader.close()
