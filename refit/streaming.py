"""The streamed install: a plan's chunks pulled through a receiver's staging slots and copied into
the engine's tensors, the direct reads beside them, digests checked as bytes land.

Chunk k is installed from its slot while the next chunks are pulled into the others; the direct reads
(runs contiguous in both the trainer's memory and an engine tensor) go on their own worker in batches
of about a chunk, all in flight at once when the plan has few chunks, else two (`direct_depth`). The
memory this runs on (slots, registrations, quarantine) is `refit.staging`'s; the reads, kept per
plan, are `refit.reads`'.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Literal

import torch

from refit.config import DEFAULT_TIMEOUTS, MIN_WAIT_S
from refit.errors import TransportError
from refit.kernels import copy_sum
from refit.plan.assemble import zero_rows
from refit.plan.records import Plan
from refit.plan.verify import Pending, Verifier
from refit.reads import PreparedReads
from refit.staging import Mapped, StagingPool
from refit.transport.jobs import ReadJob
from refit.types import SourceRecord

if TYPE_CHECKING:
    from refit.transport.nixl import Posted

logger = logging.getLogger(__name__)

DIRECT_AT_ONCE_WINDOWS = 2  # see `direct_depth`


def stream(
    pool: StagingPool,
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
    mapped: Mapped | None = None,
    copy_direct: bool = False,
) -> int:
    """Pull the rest of a streamed plan into the engine's tensors `dests`; returns descriptors posted.

    Chunks [0, `pulled`) are already in their slots. With S slots, chunk k is installed from slot
    k % S while chunks up to k + S - 1 are pulled into the others (each slot's previous chunk is
    installed already); direct reads run beside that pipeline, landed on their own worker (every
    slot's first chunk is posted before them, so the first installs run while they land; when all go
    at once between GPUs, this thread posts those chunks and batches and the workers only land them,
    else the workers post, `direct_depth` batches at a time), and the last chunk's copies run while
    they finish. `start_check` starts the re-check once the last byte has landed (the trainers'
    version words, or the catalog's READY state) and returns the wait for its answer, which runs
    after the last copies. Adds "wire" (from the first post), "validate" (the check beyond the
    install) and "install" seconds to `timings`. `install_chunk(k, slot)`, when given, installs chunk k from
    its slot instead of copying its pieces into `dests` (an engine that installs whole layers).
    Each read gets `read_deadline(deadline)`, its attempt's deadline. `verifier` digests each
    chunk in its slot on the copy stream, ahead of its copies, and each batch of direct reads as
    it lands, on a stream of its own, while this thread waits for a pull (so the check runs beside
    the reads of later batches); every digest is compared once at the end, before the refit can succeed (a mismatch
    raises DigestError; the engine is torn until a refit completes, as after a failed read). A
    chunk that `install_chunk` loads is checked before it.
    "verify" seconds (the wall time the checks add) go to `timings`.

    With `mapped` (the trainers' regions mapped on this GPU, `StagingPool.mapped_regions`; no
    `install_chunk`) nothing more is staged: the chunks past the `pulled` ones (installed from their
    slots) are digested where the trainers hold them and copied by kernels straight out of there,
    beside the direct reads, and the re-check starts once those copies have run (they read the
    trainers' memory as the reads do).

    With `copy_direct` and a `verifier`, where every direct read's trainer region is mapped on this GPU
    too (`StagingPool.direct_regions`) and every batch can be (`Verifier.copier`), the direct batches are
    not posted: kernels on two check streams copy them out of there and digest them in the same pass
    (`Verifier.copy_direct`), and the re-check starts once they have run.
    """
    entered = time.perf_counter()
    assert mapped is None or install_chunk is None
    slots = [] if mapped is not None and not pulled else pool.slots_of(plan)
    chunks = plan.chunks
    # One worker per chunk pull in flight, one for the direct reads, so all stay in flight at once.
    executor = pool.executor(len(slots))
    # 1. Direct reads write engine memory: no transfer of an earlier failed read may still be running.
    while pool.agent.in_flight():
        if time.monotonic() > deadline:
            raise TransportError(
                "a failed read into this engine is still running (its source stalled); try again later"
            )
        time.sleep(DEFAULT_TIMEOUTS.poll_s)
    # Kernels the engine queued on its stream (a generation step launched asynchronously before the
    # pause) may still read the weights: the reads and copies below run on other streams, so they wait.
    gpu = next((t.device for t in dests.values() if t.is_cuda), None)
    if gpu is not None:
        torch.cuda.current_stream(gpu).synchronize()
    direct: Future[int] | None = None
    # Batch k of direct reads landed (k), or a pull ended (None): what this thread waits on.
    landed: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    reads = pool.reads(plan, sources, dests)  # built on the first refit of a plan, then kept
    direct_reads, batches = reads.direct_reads, reads.batches
    checked = _checked(pool, plan, sources, dests, verifier, reads) if copy_direct and batches else None
    if checked is not None:
        batches = []  # copied by the check stream's kernels below, not posted
    elif batches:
        pool.connect(sources, [j for b in batches for j in b])
    pulls: dict[int, Future[int]] = {}  # chunk -> its pull, posted and not yet waited for
    posted = pulled if mapped is None else len(chunks)  # chunks [0, posted) are in their slots or being pulled
    # Copied out of the mapped regions, no chunk waits for a pull: every direct batch goes at once.
    depth = direct_depth(len(chunks), len(batches), len(slots)) if mapped is None else max(len(batches), 1)
    # All at once between GPUs, the first reads are posted by this thread before its first install (the
    # staged chunks of the free slots, then every direct batch) and only landed on the workers. Posted
    # by the workers, the posts took turns for the GIL and the agent's lock with each other and with
    # this thread (one H200, llama-8gb: the direct batches posted here but the first chunk by a worker,
    # the 9 batches went out over 2.3 ms; everything posted here, over 1.2 ms, and the refit ran 6.15-6.40
    # ms against 6.64-6.74). Between CPU processes UCX copies while posting: the workers post there.
    here = bool(batches) and depth >= len(batches) and _posted_async(batches)

    def submit(k: int, future: Future[int]) -> None:
        future.add_done_callback(lambda _: landed.put(None))
        pulls[k] = future

    def post_upto(last: int, held: list[tuple[int, Posted]] | None = None) -> None:
        """Post the pulls of chunks up to `last` (each slot's previous chunk is installed already): on
        a worker, or here into `held` (landed once submitted)."""
        nonlocal posted
        while posted < len(chunks) and posted <= last:
            chunk = reads.chunk(posted, slots[posted % len(slots)])
            pool.connect(sources, chunk)
            if held is not None and _posted_async([chunk]):
                held.append((posted, pool.post([chunk])))
            else:
                submit(posted, executor.submit(pool.read, chunk, read_deadline(deadline)))
            posted += 1

    # 2. The chunk pipeline. A prefetched version already holds its first chunks, whose slots must be
    #    installed first; every free slot is filled before the direct reads are posted, so the first
    #    installs run while they land.
    on_landed = landed.put if verifier is not None else None
    if here:
        held: list[tuple[int, Posted]] = []
        try:
            try:
                post_upto(len(slots) - 1, held)
                reads_posted = pool.post(batches)
            finally:
                for k, p in held:
                    submit(k, executor.submit(pool.land, p, read_deadline(deadline)))
        except BaseException:
            for f in pulls.values():
                f.exception()  # the chunk pulls posted already end (by their deadline) before this raises
            raise
        direct = executor.submit(pool.land, reads_posted, read_deadline(deadline), on_landed)
    else:
        post_upto(len(slots) - 1)
        if batches:
            direct = executor.submit(pool.read_batches, batches, read_deadline(deadline), on_landed, depth=depth)
    if direct is not None:
        direct.add_done_callback(lambda _: landed.put(None))
    # Copies out of staging run on a stream of their own and are waited for alone: a device-wide
    # synchronize would also wait for the transfers this process drives on the device (cuda_ipc
    # reads of the next chunk and of direct reads), serializing pull and install.
    anchor = slots[0] if slots else next(iter((mapped or checked or {}).values()))  # on the engine's GPU

    def staged(k: int) -> torch.Tensor | Mapped:
        """Where chunk k is installed from: its slot, or (past the chunks prefetched) the mapped regions."""
        return mapped if mapped is not None and k >= pulled else slots[k % len(slots)]

    copies = pool.copy_stream(anchor)
    checks = pool.check_stream(anchor)  # direct batches' digests: a chunk's copies never wait behind them
    install = validate = verify = 0.0
    descriptors = 0
    launched = Pending()
    checking = 0.0  # seconds this thread spent checking direct batches while it waited for pulls

    def check(k: int) -> None:
        nonlocal checking
        assert verifier is not None
        t = time.perf_counter()
        with _on(checks):  # compared once at the end, as the chunks'
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

    # Copied and checked in one pass, the batches take turns on two streams: the small ops of one batch's
    # check then run beside the next one's copies (one H200, llama-8gb: 4.92 ms against 5.30 on one
    # stream, `bench/scripts/checked_copy.py --streams`).
    sides = [checks, pool.check_stream(anchor, 1)] if checked is not None else [checks]
    start = time.perf_counter()
    # The wire begins with the first post: between GPUs the transfers run while later ones are posted
    # (without this, one H200's "wire" read 1.6x the copy rate).
    wire = start - entered
    trace = logger.isEnabledFor(logging.DEBUG)
    try:
        if checked is not None:  # the direct batches, issued before the first install (they are the wire)
            assert verifier is not None
            for k, group in enumerate(direct_reads):
                with _on(sides[k % len(sides)]):  # compared once at the end, as the other checks
                    launched.extend(verifier.copy_direct(group, dests, checked))
            pool.checked_copies += len(direct_reads)
            wire += time.perf_counter() - start
        for k in range(len(chunks) + (0 if chunks else 1)):
            t0 = time.perf_counter()
            c0 = checking
            post_upto(k + len(slots) - 1)  # into the slot of chunk k - 1, installed by now
            if k in pulls:
                descriptors += wait_for(pulls[k])
                del pulls[k]
            tv = time.perf_counter()
            wire += tv - t0 - (checking - c0)
            verify += checking - c0
            if verifier is not None and k < len(chunks) and install_chunk is not None:
                verifier.pieces(chunks[k].pieces, slots[k % len(slots)])  # before the engine loads it
            elif verifier is not None and k < len(chunks):
                # On the copy stream, ahead of the copies out of the slot: done before it is refilled.
                # Compared once at the end: engine memory is torn until then either way. Copied out of
                # mapped regions, the pieces are checked there: the bytes the copies then read.
                with _on(copies):
                    if isinstance(where := staged(k), torch.Tensor):
                        launched.extend(verifier.launch(chunks[k].pieces, where))
                    else:
                        for key, group in pool.mirrored(plan, k):
                            launched.extend(verifier.launch(group, where[key]))
            t1 = time.perf_counter()
            verify += t1 - tv
            t_issued = t1
            if k < len(chunks) and install_chunk is not None:
                install_chunk(k, slots[k % len(slots)])  # returns once nothing reads the slot any more
                t_issued = time.perf_counter()
            elif k < len(chunks):
                where = staged(k)
                with _on(copies):
                    pool.copier(plan, k, where, dests).run(copies)
                pool.mapped_chunks += not isinstance(where, torch.Tensor)
                t_issued = time.perf_counter()
                if k < len(chunks) - 1 and mapped is None:
                    _wait(copies)  # a slot is refilled only after the copies out of it ran
            t2 = time.perf_counter()
            install += t2 - t1
            if trace:
                logger.debug("%s: chunk %d pulled at %.2f ms, copies issued by %.2f ms, done by %.2f ms",
                             pool.label, k, 1e3 * (t1 - start), 1e3 * (t_issued - start),
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
        # Copies out of the mapped regions read the trainers' memory: the words are read once they have run.
        if mapped is not None:
            _wait(copies)
        if checked is not None:
            for s in sides:
                _wait(s)
        finish = start_check()
        if install_chunk is None:
            with _on(copies):
                zero_rows(reads.padding, dests)
        _wait(copies)
        for s in sides:
            _wait(s)
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
                         pool.label, 1e3 * (t4 - start), 1e3 * (t5 - start), 1e3 * (t6 - start))  # fmt: skip
    finally:
        _wait(copies)  # the copies out of a slot end before a later refit may refill it
        for s in sides:
            _wait(s)  # and the checks of engine memory before later reads overwrite it
        for f in (*pulls.values(), direct):
            if f is not None:
                f.exception()  # a pull still in flight after a failure ends by its own deadline
    timings["wire"] = timings.get("wire", 0.0) + wire
    timings["validate"] = timings.get("validate", 0.0) + validate
    timings["install"] = install
    if verifier is not None:
        timings["verify"] = timings.get("verify", 0.0) + verify  # wall time; the direct check overlaps
    return descriptors


def _checked(
    pool: StagingPool,
    plan: Plan,
    sources: Sequence[SourceRecord],
    dests: Mapping[str, torch.Tensor],
    verifier: Verifier | None,
    reads: PreparedReads,
) -> Mapped | None:
    """The mapped regions every batch of direct reads is copied and digested out of, in one pass; None
    unless all of them can be (a verifier, every region on this GPU, every batch laid out)."""
    if verifier is None:
        return None
    regions = pool.direct_regions(plan, sources)
    if regions is None or not copy_sum.usable(next(iter(regions.values())).device):
        return None
    # Laying every batch out again is host time before the first copy: the answer is kept while the
    # reads (rebuilt when an engine tensor moves), the mapped regions and the ranks with digests stay.
    key = (verifier.ranks, reads, *(v.data_ptr() for v in regions.values()))
    if pool.checked is None or pool.checked[0] != key:
        pool.checked = key, all(verifier.copier(b, dests, regions) is not None for b in reads.direct_reads)
    return regions if pool.checked[1] else None


def direct_depth(chunks: int, batches: int, slots: int) -> int:
    """How many batches of direct reads are in flight at once: all of them when the staged chunks fill
    at most two windows (`DIRECT_AT_ONCE_WINDOWS` x `slots` chunks), else two.

    A peer serves the transfers posted to it in order, so a chunk pulled after the batches were posted
    waits behind all of them; with few chunks that costs only the tail (the chunks then follow the
    batches at the link's rate, each install beside the next chunk's pull), while many chunks whose
    installs take longer than their pulls would pile up behind the batches. Posted at once, 15 GiB in
    9 batches ran 41.6 ms on two H200s against 42.4-43.5 ms two at a time (one READ: 41.1 ms), and
    7.8 against 8.4 ms on one H200 (`bench/scripts/batched_read.py`).
    """
    return max(batches, 1) if chunks <= DIRECT_AT_ONCE_WINDOWS * slots else 2


def _posted_async(batches: Sequence[Sequence[ReadJob]]) -> bool:
    """Whether posting these reads only starts them: GPU to GPU (cuda_ipc copies on streams). Between
    CPU processes UCX's cma copies while posting, so a post is the read itself and stays on the worker,
    beside this thread's installs and checks (posted here, a CPU refit ran 1.2-1.7x slower)."""
    return all(j.local_device == j.remote_device == "cuda" for b in batches for j in b)


def _next(landed: queue.SimpleQueue[int | None]) -> int | Literal[False] | None:
    """The next item of `landed` without waiting; False when there is none."""
    try:
        return landed.get_nowait()
    except queue.Empty:
        return False


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _wait(stream: torch.cuda.Stream | None) -> None:
    if stream is not None:
        stream.synchronize()
