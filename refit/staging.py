"""A receiver's registered memory and the pulls into it: staging buffers, set-aside buffers of
failed reads, the engine storages that direct reads write into, and the streamed install.

Staging is one buffer per slot (one slot when a refit fits the window; two when chunks stream, one
pulled while the other is installed), registered once and reused by every later refit. A read that
fails or times out may leave transfers running into its buffers, so those are set aside
(quarantined) and freed only once no transfer is still running; the next refit gets fresh ones.
Engine storages are registered the first time a direct read targets them and stay registered.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch

from refit.config import DEFAULT_TIMEOUTS
from refit.copies import ChunkCopier
from refit.dtypes import device_of
from refit.errors import TransportError
from refit.plan.assemble import zero_padding
from refit.plan.records import Chunk, DirectRead, Plan
from refit.plan.verify import Pending, Verifier
from refit.transport.jobs import ReadJob, direct_jobs, jobs_for
from refit.transport.nixl import NixlAgent
from refit.types import SourceRecord

logger = logging.getLogger(__name__)

# Staging buffers a closed receiver could not free: a failed read may still write into them.
_PARKED: list[torch.Tensor] = []

MIN_WAIT_S = 0.001  # a wait whose deadline has passed still gets this long, so it fails by its own error


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
        self._executor: ThreadPoolExecutor | None = None
        self._stream: torch.cuda.Stream | None = None
        self._copiers: dict[int, ChunkCopier] = {}  # chunk index -> its copies, for `_copiers_plan`
        self._copiers_plan: Plan | None = None

    @property
    def staging_bytes(self) -> int:
        return sum(s.numel() for s in self._slots if s is not None)

    @property
    def quarantined_bytes(self) -> int:
        return sum(t.numel() for t in self._quarantine)

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
        metadata = {s.agent_name: s.agent_metadata for s in sources}
        for agent_name in dict.fromkeys(j.agent_name for j in jobs):
            self.agent.connect(agent_name, metadata[agent_name])

    def read(self, jobs: list[ReadJob], deadline: float) -> int:
        """Pull `jobs`; after a failure staging is set aside (a transfer that did not stop may still write)."""
        return self.read_batches([jobs], deadline)

    def read_batches(
        self, batches: list[list[ReadJob]], deadline: float, landed: Callable[[int], None] | None = None
    ) -> int:
        """`read` of `batches` in order, two in flight at a time; `landed(k)` once batch k is in."""
        try:
            timeout_s = max(deadline - time.monotonic(), MIN_WAIT_S)
            return self.agent.read_batches(batches, timeout_s=timeout_s, landed=landed)
        except BaseException:
            self.quarantine()
            raise

    def stream(
        self,
        *,
        plan: Plan,
        sources: Sequence[SourceRecord],
        pulled: int,
        dests: Mapping[str, torch.Tensor],
        deadline: float,
        start_check: Callable[[], Callable[[], None]],
        timings: dict[str, float],
        install_chunk: Callable[[int, torch.Tensor], None] | None = None,
        read_deadline: Callable[[float], float] = lambda deadline: deadline,
        verifier: Verifier | None = None,
    ) -> int:
        """Pull the rest of a streamed plan into the engine's tensors `dests`; returns descriptors posted.

        Chunks [0, `pulled`) are already in their slots. Chunk k is installed from slot k % 2 while
        chunk k + 1 is pulled into the other slot (whose chunk k - 1 is installed already); direct
        reads run beside that pipeline, on their own worker (chunk 0 is posted first, so its copies
        run while they land), and the last chunk's copies run while they finish. `start_check` sends
        the READY re-check once the last byte has landed and returns the wait for its answer, which
        runs after the last copies. Adds "wire", "validate" (the check beyond the install) and
        "install" seconds to `timings`. `install_chunk(k, slot)`, when given, installs chunk k from
        its slot instead of copying its pieces into `dests` (an engine that installs whole layers).
        Each read gets `read_deadline(deadline)`, its attempt's deadline. `verifier` digests each
        chunk in its slot on the copy stream, ahead of its copies, and each batch of direct reads as
        it lands (while this thread waits for a pull, so the check runs beside the reads of later
        batches); every digest is compared once at the end, before the refit can succeed (a mismatch
        raises DigestError; the engine is torn until a refit completes, as after a failed read). A
        chunk that `install_chunk` loads is checked before it.
        "verify" seconds (the wall time the checks add) go to `timings`.
        """
        slots = self._slots_of(plan)
        chunks = plan.chunks
        if self._executor is None:
            # One worker pulls the chunks, the other the direct reads, so both stay in flight at once.
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"refit-pull-{self._label}")
        executor = self._executor
        # 1. Direct reads write engine memory: no transfer of an earlier failed read may still be running.
        while self.agent.in_flight():
            if time.monotonic() > deadline:
                raise TransportError(
                    "a failed read into this engine is still running (its source stalled); try again later"
                )
            time.sleep(DEFAULT_TIMEOUTS.poll_s)
        direct: Future[int] | None = None
        # Batch k of direct reads landed (k), or a pull ended (None): what this thread waits on.
        landed: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        direct_reads: list[list[DirectRead]] = []
        batches: list[list[ReadJob]] = []
        if plan.direct:
            self.register_engine(dests[d.target] for d in plan.direct)
            where = {
                d.target: (t.data_ptr(), *device_of(t), t.untyped_storage().data_ptr())
                for d in plan.direct
                for t in (dests[d.target],)
            }
            # In batches of about a chunk, two in flight: a chunk's read, posted meanwhile, then waits
            # behind two batches rather than behind every direct read (a peer's transfers run in order).
            direct_reads = _batches(plan.direct, _chunk_size(plan))
            batches = [direct_jobs(b, sources, where) for b in direct_reads]
            self.connect(sources, [j for b in batches for j in b])

        def pull(k: int) -> tuple[Future[int], int]:
            chunk = chunk_jobs(chunks[k], sources, slots[k % len(slots)])
            self.connect(sources, chunk)
            future = executor.submit(self.read, chunk, read_deadline(deadline))
            future.add_done_callback(lambda _: landed.put(None))
            return future, k + 1

        # 2. The chunk pipeline: chunks [0, ready) are in their slots; the pull in flight ends at upto.
        #    A prefetched version already holds chunks 0 and 1, whose slots must be installed first.
        #    Chunk 0 is posted before the direct reads, so its install runs while they land.
        ready = pulled
        pending, upto = pull(0) if ready == 0 and chunks else (None, ready)
        if batches:
            on_landed = landed.put if verifier is not None else None
            direct = executor.submit(self.read_batches, batches, read_deadline(deadline), on_landed)
            direct.add_done_callback(lambda _: landed.put(None))
        # Copies out of staging run on a stream of their own and are waited for alone: a device-wide
        # synchronize would also wait for the transfers this process drives on the device (cuda_ipc
        # reads of the next chunk and of direct reads), serializing pull and install.
        copies = self._copy_stream(slots[0])
        wire = install = validate = verify = 0.0
        descriptors = 0
        launched = Pending()
        checking = 0.0  # seconds this thread spent checking direct batches while it waited for pulls

        def check(k: int) -> None:
            nonlocal checking
            assert verifier is not None
            t = time.perf_counter()
            with _on(copies):  # on a GPU, ahead of the copies (compared once at the end, as the chunks')
                launched.extend(verifier.launch_direct(direct_reads[k], dests))
            checking += time.perf_counter() - t

        def wait_for(future: Future[int]) -> int:
            """`future.result()`, checking the direct batches that land meanwhile."""
            while not future.done():
                try:
                    k = landed.get(timeout=max(deadline - time.monotonic(), MIN_WAIT_S))
                except queue.Empty:
                    continue  # the pull ends by its own deadline
                if k is not None:
                    check(k)
            return future.result()

        start = time.perf_counter()
        trace = logger.isEnabledFor(logging.DEBUG)
        try:
            for k in range(len(chunks) + (0 if chunks else 1)):
                t0 = time.perf_counter()
                c0 = checking
                while k < len(chunks) and k >= ready:
                    if pending is None:
                        pending, upto = pull(ready)
                    descriptors += wait_for(pending)
                    pending, ready = None, upto
                if pending is None and k + 1 < len(chunks) and k + 1 >= ready:
                    pending, upto = pull(k + 1)
                tv = time.perf_counter()
                wire += tv - t0 - (checking - c0)
                verify += checking - c0
                if verifier is not None and k < len(chunks) and install_chunk is not None:
                    verifier.pieces(chunks[k].pieces, slots[k % len(slots)])  # before the engine loads it
                elif verifier is not None and k < len(chunks):
                    # On the copy stream, ahead of the copies out of the slot: done before it is refilled.
                    # Compared once at the end: engine memory is torn until then either way.
                    with _on(copies):
                        launched.extend(verifier.launch(chunks[k].pieces, slots[k % len(slots)]))
                t1 = time.perf_counter()
                verify += t1 - tv
                t_issued = t1
                if k < len(chunks) and install_chunk is not None:
                    install_chunk(k, slots[k % len(slots)])  # returns once nothing reads the slot any more
                    t_issued = time.perf_counter()
                elif k < len(chunks):
                    with _on(copies):
                        self._copier(plan, k, slots[k % len(slots)], dests).run(copies)
                    t_issued = time.perf_counter()
                    if k < len(chunks) - 1:
                        _wait(copies)  # a slot is refilled only after the copies out of it ran
                t2 = time.perf_counter()
                install += t2 - t1
                if trace:
                    logger.debug("%s: chunk %d pulled at %.2f ms, copies issued by %.2f ms, done by %.2f ms",
                                 self._label, k, 1e3 * (t1 - start), 1e3 * (t_issued - start),
                                 1e3 * (t2 - start))  # fmt: skip
            # The last chunk's copies run while the direct reads finish. The READY re-check is sent once
            # the last byte has landed; its round trip runs in gRPC's threads beside those copies, and
            # the refit succeeds only if it passes.
            t3 = time.perf_counter()
            c0 = checking
            if direct is not None:
                descriptors += wait_for(direct)
                direct = None
            while (k := _next(landed)) is not False:  # batches that landed after the last wait
                if k is not None:
                    check(k)
            t4 = time.perf_counter()
            finish = start_check()
            if install_chunk is None:
                with _on(copies):
                    zero_padding(plan.targets, dests)
            _wait(copies)
            t5 = time.perf_counter()
            if verifier is not None and launched.got:
                verifier.compare(launched)  # every digest, one host sync; a mismatch fails the refit here
            t6 = time.perf_counter()
            finish()
            t7 = time.perf_counter()
            wire += t4 - t3 - (checking - c0)
            verify += checking - c0
            install += t5 - t4
            verify += t6 - t5
            validate += t7 - t6
            if trace:
                logger.debug("%s: direct reads done at %.2f ms, copies at %.2f ms, READY re-check at %.2f ms",
                             self._label, 1e3 * (t4 - start), 1e3 * (t5 - start), 1e3 * (t6 - start))  # fmt: skip
        finally:
            _wait(copies)  # the copies out of a slot end before a later refit may refill it
            for f in (pending, direct):
                if f is not None:
                    f.exception()  # a pull still in flight after a failure ends by its own deadline
        timings["wire"] = timings.get("wire", 0.0) + wire
        timings["validate"] = timings.get("validate", 0.0) + validate
        timings["install"] = install
        if verifier is not None:
            timings["verify"] = timings.get("verify", 0.0) + verify  # wall time; the direct check overlaps
        return descriptors

    def prefetch(
        self, plan: Plan, sources: Sequence[SourceRecord], deadline: float, device: torch.device, *, chunks: int
    ) -> tuple[int, int, list[torch.Tensor]]:
        """Allocate the plan's slots (two when chunks stream) and pull its first `chunks` chunks, at
        most as many as there are slots unless the plan is a single chunk.

        Returns (chunks pulled, descriptors posted, slots).
        """
        count = 2 if plan.streamed else 1
        slots = self.slots(count, _chunk_size(plan), device)
        first = plan.chunks[: min(chunks, count)]
        jobs = [j for k, c in enumerate(first) for j in chunk_jobs(c, sources, slots[k % len(slots)])]
        self.connect(sources, jobs)
        return len(first), self.read(jobs, deadline) if jobs else 0, slots

    def _copier(self, plan: Plan, k: int, slot: torch.Tensor, dests: Mapping[str, torch.Tensor]) -> ChunkCopier:
        """Chunk k's copies out of `slot` into `dests`, built once per plan and kept while valid."""
        if plan is not self._copiers_plan:
            self._copiers, self._copiers_plan = {}, plan
        copier = self._copiers.get(k)
        if copier is None or not copier.valid(slot, dests):
            copier = self._copiers[k] = ChunkCopier(plan, k, slot, dests)
        return copier

    def _copy_stream(self, t: torch.Tensor) -> torch.cuda.Stream | None:
        if not t.is_cuda:
            return None
        if self._stream is None or self._stream.device != t.device:
            self._stream = torch.cuda.Stream(device=t.device)
        return self._stream

    def _slots_of(self, plan: Plan) -> list[torch.Tensor]:
        held = [s for s in self._slots if s is not None]
        if len(held) != (2 if plan.streamed else 1) or any(s.numel() < _chunk_size(plan) for s in held):
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
        self._copiers, self._copiers_plan = {}, None


def chunk_jobs(chunk: Chunk, sources: Sequence[SourceRecord], slot: torch.Tensor) -> list[ReadJob]:
    """The READ jobs that fill `slot` with `chunk`."""
    return jobs_for(chunk, sources, slot.data_ptr(), *device_of(slot))


def _batches(reads: Sequence[DirectRead], nbytes: int) -> list[list[DirectRead]]:
    """`reads` in order, cut into runs of about `nbytes` (one run when `nbytes` is 0: no chunks to yield to)."""
    if nbytes <= 0:
        return [list(reads)]
    out: list[list[DirectRead]] = [[]]
    held = 0
    for r in reads:
        if out[-1] and held + r.nbytes > nbytes:
            out.append([])
            held = 0
        out[-1].append(r)
        held += r.nbytes
    return out


def _next(landed: queue.SimpleQueue[int | None]) -> int | Literal[False] | None:
    """The next item of `landed` without waiting; False when there is none."""
    try:
        return landed.get_nowait()
    except queue.Empty:
        return False


def _chunk_size(plan: Plan) -> int:
    return max((c.staging_bytes for c in plan.chunks), default=0)


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _wait(stream: torch.cuda.Stream | None) -> None:
    if stream is not None:
        stream.synchronize()
