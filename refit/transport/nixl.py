"""The NIXL data plane: one agent per process, few large registrations, batched READs.

NIXL is imported lazily (`refit.transport.ucx`, which first sets the UCX defaults that decide between
the fast path and a thousand-times slower one; the user's own settings always win).
Descriptors travel in refit's own schema (see `refit.types`); NIXL's pickled descriptor lists are
never used, and nothing received from the network is unpickled.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from refit.compat import nixl as compat
from refit.config import DEFAULT_TIMEOUTS
from refit.errors import TransferTimeoutError, TransportError
from refit.transport.cuda_ipc import IpcCopy, LocalPeers
from refit.transport.jobs import Posted, ReadJob, ReadOp, descriptor_rows, merge_reads
from refit.transport.ucx import load_nixl_api, progress_delay_us

logger = logging.getLogger(__name__)

__all__ = ["NixlAgent", "Posted", "ReadJob", "ReadOp", "merge_reads"]

_MEM = {"cpu": "DRAM", "cuda": "VRAM"}
# The most jobs whose NIXL descriptors an agent keeps (a streamed refit of Llama-3-8B has ~70).
_DESCRIBED_JOBS = 4096
# READ polling: spin briefly, then back off to this; most reads finish well under a millisecond per MB.
_POLL_STEP_S = 0.00005
_POLL_MAX_S = 0.002
# Reads of GPU memory back off less: a GPU link moves 0.4-2 MB per microsecond, and the time between a
# read landing and its poll seeing it delays what waits for it (the next batch, a chunk's install). At
# the 2 ms cap, 8 GB read over NVLink in one transfer ran 1 ms longer than the same copy in CUDA.
_POLL_MAX_GPU_S = 0.0002
# Copies this process enqueued itself (`IpcCopy`): a poll is one event query, cheap enough to spin on.
_POLL_MAX_LOCAL_S = 0.00002


class _ClosedAgent:
    """Stands in for the NIXL agent after `NixlAgent.close()`: any use is a TransportError."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # protocol probes (copy, pickle, hasattr) get the usual answer
            raise AttributeError(attr)
        raise TransportError(f"NIXL agent {self._name} is closed")


class NixlAgent:
    """A process's NIXL agent: registrations, remote peers and batched READs.

    One agent per process; methods are serialised by a lock because NIXL's default sync mode
    does no locking of its own.
    """

    def __init__(self, name: str | None = None, *, prefix: str = "refit") -> None:
        api = load_nixl_api()
        self.name = name or f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.RLock()
        try:
            self._agent = compat.create_agent(api, self.name, backends=["UCX"], progress_delay_us=progress_delay_us())
        except Exception as exc:  # NIXL raises its own exception types from C++
            raise TransportError(f"cannot create NIXL agent {self.name}: {exc}") from exc
        self._registrations: dict[tuple[int, int, str, int], Any] = {}
        self._remotes: dict[str, bytes] = {}
        self._abandoned: list[Any] = []  # handles of failed reads still in progress (see `in_flight`)
        self._descs: dict[int, tuple[ReadJob, tuple[Any, Any, int, int] | None]] = {}  # see `_described`
        self._closed = False
        self.num_registrations = 0  # lifetime count, so callers can prove reuse
        # Peers on this host whose GPU jobs this process copies itself (`refit.transport.cuda_ipc`).
        self.local: LocalPeers | None = None

    # -- registration ---------------------------------------------------------------------------

    def register(self, addr: int, nbytes: int, *, device: str = "cpu", device_id: int = 0) -> None:
        """Register one memory block (idempotent for an identical block)."""
        key = (addr, nbytes, device, device_id)
        with self._lock:
            if key in self._registrations:
                return
            mem = "VRAM" if device == "cuda" else "DRAM"
            descs = self._agent.get_reg_descs([(addr, nbytes, device_id, "")], mem)
            if descs is None:
                raise TransportError(f"NIXL rejected region {addr:#x}+{nbytes}")
            try:
                self._registrations[key] = self._agent.register_memory(descs)
            except Exception as exc:
                raise TransportError(f"cannot register {nbytes} bytes at {addr:#x}: {exc}") from exc
            self.num_registrations += 1

    def deregister(self, addr: int, nbytes: int, *, device: str = "cpu", device_id: int = 0) -> None:
        with self._lock:
            handle = self._registrations.pop((addr, nbytes, device, device_id), None)
            if handle is not None:
                self._agent.deregister_memory(handle)

    def metadata(self) -> bytes:
        with self._lock:
            return bytes(self._agent.get_agent_metadata())

    def backends(self) -> dict[str, list[str]]:
        """What this NIXL build offers: `plugins` (every backend plugin it can load) and `ucx_memory`
        (the memory kinds its UCX backend registers: DRAM_SEG, and VRAM_SEG with CUDA support)."""
        with self._lock:
            return {
                "plugins": sorted(str(p) for p in self._agent.get_plugin_list()),
                "ucx_memory": sorted(str(m) for m in self._agent.get_backend_mem_types("UCX")),
            }

    # -- peers ----------------------------------------------------------------------------------

    def connect(self, agent_name: str, metadata: bytes) -> None:
        """Load (or refresh) a remote agent's metadata; a changed blob replaces the stale one."""
        with self._lock:
            known = self._remotes.get(agent_name)
            if known == metadata:
                return
            try:
                if known is not None:
                    self._agent.remove_remote_agent(agent_name)
                added = self._agent.add_remote_agent(metadata)
            except Exception as exc:
                raise TransportError(
                    f"cannot load metadata of NIXL agent {agent_name}: {exc}", agent_name=agent_name
                ) from exc
            added = added.decode() if isinstance(added, bytes) else str(added)
            if added != agent_name:
                raise TransportError(f"metadata names agent {added!r}, catalog says {agent_name!r}")
            self._remotes[agent_name] = metadata
            try:
                # Connecting now keeps the endpoint set-up (~20 ms) off the first refit.
                self._agent.make_connection(agent_name)
            except Exception:  # a lazy connection on first READ still works
                logger.debug("make_connection(%s) failed; connecting on first read", agent_name, exc_info=True)

    # -- transfers ------------------------------------------------------------------------------

    def read(self, jobs: Sequence[ReadJob], *, timeout_s: float = DEFAULT_TIMEOUTS.update_s) -> int:
        """Pull every job (one remote agent each) as one NIXL transfer per job, all in flight at once.

        Returns the number of descriptors posted after merging. Raises TransportError (or
        TransferTimeoutError when the deadline passes). Finished handles are released. A failed
        read may leave transfers in progress: releasing their handles does not stop them (measured
        with UCX over TCP: a timed-out READ released here still wrote all its bytes once the remote
        resumed), so those handles are kept and `in_flight()` says when their writes have ended;
        until then the caller must neither reuse nor free the local memory they target.
        """
        return self.read_batches([jobs], timeout_s=timeout_s)

    def read_batches(
        self,
        batches: Sequence[Sequence[ReadJob]],
        *,
        depth: int = 2,
        timeout_s: float = DEFAULT_TIMEOUTS.update_s,
        landed: Callable[[int], None] | None = None,
    ) -> int:
        """Pull `batches` in order, at most `depth` of them in flight at once; as `read` otherwise.

        A transport serves the transfers of one peer in the order they were posted, so a read posted
        by another thread meanwhile waits behind at most `depth` batches instead of behind all of them.
        `landed(k)`, when given, is called (in this thread) once every byte of batch k has landed, so
        a caller can check a batch while later ones are still being pulled: as soon as this thread sees
        it, after each batch it posts.
        """
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        posted = Posted()
        reported = 0  # batches [0, reported) have landed and been reported
        deadline = time.monotonic() + timeout_s
        finished = False
        try:
            for k, jobs in enumerate(batches):
                self._post_batch(posted, jobs)
                # Report what has landed already (a transport that copies while posting, as UCX's cma
                # does between processes on one host, has finished the batch just posted), then wait
                # until at most `depth` batches are in flight.
                while reported <= k and self._done(posted.batches[reported]):
                    self._land(posted, reported, deadline, landed)
                    reported += 1
                while reported <= k + 1 - depth:
                    self._land(posted, reported, deadline, landed)
                    reported += 1
            for k in range(reported, len(posted.batches)):
                self._land(posted, k, deadline, landed)
            finished = True
        finally:
            self._settle(posted, finished)
        return posted.descriptors

    def post(self, batches: Sequence[Sequence[ReadJob]]) -> Posted:
        """Post every batch's READs now, all in flight at once; `land` waits for them (on any thread).
        On failure the READs posted so far are settled as a failed `read`'s and the error raised."""
        posted = Posted()
        try:
            for jobs in batches:
                self._post_batch(posted, jobs)
        except BaseException:
            self._settle(posted, finished=False)
            raise
        return posted

    def land(
        self,
        posted: Posted,
        *,
        timeout_s: float = DEFAULT_TIMEOUTS.update_s,
        landed: Callable[[int], None] | None = None,
    ) -> int:
        """Wait for `posted`'s batches in order, `landed(k)` after each, as `read_batches`; returns the
        descriptors posted. Its transfers are released (or, failed, set aside as `read`'s) here."""
        deadline = time.monotonic() + timeout_s
        finished = False
        try:
            for k in range(len(posted.batches)):
                self._land(posted, k, deadline, landed)
            finished = True
        finally:
            self._settle(posted, finished)
        return posted.descriptors

    def _post_batch(self, posted: Posted, jobs: Sequence[ReadJob]) -> None:
        batch: list[tuple[Any, ReadJob, int]] = []
        posted.batches.append(batch)
        for job in jobs:
            if self.local is not None and self.local.owns(job):
                copied = self.local.post(job)  # no NIXL state: no lock
                batch.append((copied, job, copied.nbytes))
                posted.descriptors += copied.descriptors
                continue
            with self._lock:
                described = self._described(job)
                if described is None:
                    continue
                local, remote, n, nbytes = described
                handle = self._start_read(job.agent_name, local, remote)
            batch.append((handle, job, nbytes))
            posted.descriptors += n
        if logger.isEnabledFor(logging.DEBUG):
            what = ", ".join(f"{j.agent_name} {b >> 20} MiB" for _, j, b in batch)
            logger.debug("%s: batch %d posted at %.2f ms: %s", self.name, len(posted.batches) - 1, posted.ms(), what)

    def _settle(self, posted: Posted, finished: bool) -> None:
        """Release `posted`'s transfers; after a failure, those still running are set aside (`in_flight`)."""
        with self._lock:
            for batch in posted.batches:
                for handle, _, _ in batch:
                    if finished or self._settled(handle):
                        self._release(handle)
                    else:
                        self._abandoned.append(handle)

    def _land(self, posted: Posted, k: int, deadline: float, landed: Callable[[int], None] | None) -> None:
        """Wait for every transfer of batch k, then report it (and, tracing, when it landed)."""
        for handle, job, nbytes in posted.batches[k]:
            cap = _POLL_MAX_S if job.local_device == job.remote_device == "cpu" else _POLL_MAX_GPU_S
            cap = _POLL_MAX_LOCAL_S if isinstance(handle, IpcCopy) else cap
            self._wait(handle, job.agent_name, deadline, nbytes, cap)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: batch %d landed at %.2f ms", self.name, k, posted.ms())
        if landed is not None:
            landed(k)

    def _done(self, batch: Sequence[tuple[Any, ReadJob, int]]) -> bool:
        """Whether every transfer of `batch` is DONE, without waiting (a failed one is not: `_land` raises)."""
        try:
            return all(self._state(handle) == "DONE" for handle, _, _ in batch)
        except Exception:  # NIXL raises on a lost remote; `_land` raises it in its own words
            logger.debug("a NIXL transfer failed", exc_info=True)
            return False

    def _state(self, handle: Any) -> str:
        if isinstance(handle, IpcCopy):
            return handle.state()
        with self._lock:
            return self._agent.check_xfer_state(handle)

    def in_flight(self) -> int:
        """How many transfers of failed reads are still in progress; the ones that ended are released.

        While this is not 0, memory a failed read targeted may still be written.
        """
        with self._lock:
            still = []
            for handle in self._abandoned:
                if self._settled(handle):
                    self._release(handle)
                else:
                    still.append(handle)
            self._abandoned = still
            return len(still)

    def _described(self, job: ReadJob) -> tuple[Any, Any, int, int] | None:
        """NIXL's (local, remote) descriptor lists of `job`, its descriptor count and bytes (None: no
        bytes). Kept per job object: a receiver keeps a plan's jobs across refits, which then skip
        merging and describing their ranges (hundreds of them at Llama-3-8B's 291 tensors)."""
        hit = self._descs.get(id(job))
        if hit is not None and hit[0] is job:
            return hit[1]
        rows = descriptor_rows(job)
        described = None
        if rows is not None:
            local, remote = rows
            local_descs = self._agent.get_xfer_descs(local, _MEM[job.local_device])
            remote_descs = self._agent.get_xfer_descs(remote, _MEM[job.remote_device])
            if local_descs is None or remote_descs is None:
                raise TransportError("NIXL rejected the transfer descriptors")
            described = (local_descs, remote_descs, len(local), int(local[:, 1].sum()))
        if len(self._descs) >= _DESCRIBED_JOBS:
            self._descs.clear()  # jobs of plans no longer used; the current ones are described again
        self._descs[id(job)] = (job, described)  # the job is held, so its id is not reused meanwhile
        return described

    def _start_read(self, agent_name: str, local_descs: Any, remote_descs: Any) -> Any:
        try:
            handle = self._agent.initialize_xfer("READ", local_descs, remote_descs, agent_name)
            state = self._agent.transfer(handle)
        except Exception as exc:
            raise TransportError(f"READ from {agent_name} could not start: {exc}", agent_name=agent_name) from exc
        if state == "ERR":
            self._release(handle)
            raise TransportError(f"READ from {agent_name} failed to post", agent_name=agent_name)
        return handle

    def _wait(self, handle: Any, agent_name: str, deadline: float, nbytes: int, cap: float = _POLL_MAX_S) -> None:
        sleep = 0.0
        while True:
            try:
                state = self._state(handle)
            except Exception as exc:
                raise TransportError(f"READ from {agent_name} failed: {exc}", agent_name=agent_name) from exc
            if state == "DONE":
                return
            if state == "ERR":
                raise TransportError(f"READ of {nbytes} bytes from {agent_name} failed", agent_name=agent_name)
            if time.monotonic() > deadline:
                raise TransferTimeoutError(
                    f"READ of {nbytes} bytes from {agent_name} did not finish in time", agent_name=agent_name
                )
            if sleep:
                time.sleep(sleep)
            sleep = min(cap, sleep + _POLL_STEP_S)

    def _settled(self, handle: Any) -> bool:
        """Whether a transfer has ended (done, failed, or its remote gone): no more bytes will land."""
        try:
            return self._state(handle) != "PROC"
        except Exception:  # NIXL reports a lost remote by raising: nothing more arrives from it
            logger.debug("a NIXL transfer ended with an error", exc_info=True)
            return True

    def _release(self, handle: Any) -> None:
        if isinstance(handle, IpcCopy):
            return
        try:
            self._agent.release_xfer_handle(handle)
        except Exception:  # a failed release is queued by NIXL itself; nothing to undo here
            logger.debug("release of a NIXL transfer handle failed", exc_info=True)

    # -- life cycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Drop peers and registrations, then the NIXL agent itself; idempotent.

        Transfers still in flight are released (NIXL cancels what it can). The agent and its UCX
        progress thread end here, not whenever this object is collected; later calls raise
        TransportError.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for handle in self._abandoned:
                self._release(handle)
            self._abandoned.clear()
            for name in list(self._remotes):
                try:
                    self._agent.remove_remote_agent(name)
                except Exception:
                    logger.debug("remove_remote_agent(%s) failed", name, exc_info=True)
            self._remotes.clear()
            for handle in self._registrations.values():
                try:
                    self._agent.deregister_memory(handle)
                except Exception:
                    logger.debug("deregister_memory failed", exc_info=True)
            self._registrations.clear()
            if self.local is not None:
                self.local.close()
            self._descs.clear()  # NIXL objects of the agent: dropped before it
            # The last reference to NIXL's agent: its destructor stops the progress thread now.
            self._agent = _ClosedAgent(self.name)

    def __enter__(self) -> NixlAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
