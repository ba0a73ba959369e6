"""The NIXL data plane: one agent per process, few large registrations, batched READs.

NIXL is imported lazily and only here. UCX defaults that decide between the fast path and a
thousand-times slower one are set before the first import (the user's own settings always win).
Descriptors travel in refit's own schema (see `refit.types`); NIXL's pickled descriptor lists are
never used, and nothing received from the network is unpickled.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from refit.errors import TransferTimeoutError, TransportError

logger = logging.getLogger(__name__)

_api_lock = threading.Lock()
_api: ModuleType | None = None

# UCX settings refit needs for a fast pull; each applies only when the user has not set it.
UCX_DEFAULTS: dict[str, str] = {
    # vLLM sets this before importing NIXL to avoid a rare UCX registration-cache leak.
    "UCX_RCACHE_MAX_UNRELEASED": "1024",
    # NIXL logs every agent's creation at INFO to stdout, which would mix into callers' output.
    "NIXL_LOG_LEVEL": "WARN",
}
UCX_CUDA_DEFAULTS: dict[str, str] = {
    # Without NVLink, UCX disables cuda_ipc get_zcopy and a READ falls to ~0.5 GB/s (vs ~1.5 TB/s).
    "UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y",
}


def apply_ucx_defaults(environ: dict[str, str] | None = None, *, cuda: bool | None = None) -> dict[str, str]:
    """Set refit's UCX defaults where unset; returns the values that were applied."""
    env = os.environ if environ is None else environ
    wanted = dict(UCX_DEFAULTS)
    if cuda if cuda is not None else _cuda_major() is not None:
        wanted.update(UCX_CUDA_DEFAULTS)
    applied = {}
    for key, value in wanted.items():
        if key not in env:
            env[key] = value
            applied[key] = value
    if applied:
        logger.debug("applied UCX defaults %s", applied)
    return applied


# NIXL's Python wrapper hard-codes the UCX progress thread's delay to 0, so the thread spins a whole
# core in every process that holds an agent, idle or not (measured: 3.7 s of CPU in 4 s on an idle
# trainer rank). 1 ms keeps idle cost near zero; reads are driven by the reader's own polling.
PROGRESS_DELAY_US = int(os.environ.get("REFIT_NIXL_PROGRESS_DELAY_US", "1000"))


def _new_agent(api: ModuleType, name: str) -> Any:
    """`nixl_agent(name)` with UCX only and the progress-thread delay above (under the API lock)."""
    base = api.nixlBind.nixlAgentConfig

    class _Config(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, key: str, value: object) -> None:
            if key == "pthrDelay":
                value = max(int(value), PROGRESS_DELAY_US)  # type: ignore[call-overload]
            super().__setattr__(key, value)

    with _api_lock:
        api.nixlBind.nixlAgentConfig = _Config
        try:
            return api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
        finally:
            api.nixlBind.nixlAgentConfig = base


def _cuda_major() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    version = getattr(torch.version, "cuda", None)
    return int(version.split(".")[0]) if version else None


def load_nixl_api() -> ModuleType:
    """Import NIXL's Python API, choosing the wheel that matches this process.

    The `nixl` meta package picks `nixl_cu13` as soon as it detects CUDA 13 tools, GPU or not; we
    pick by the CUDA build of the torch in this process instead, and fall back to any wheel that
    imports, so the same code works on CPU-only and GPU machines.
    """
    global _api
    with _api_lock:
        if _api is not None:
            return _api
        apply_ucx_defaults()
        major = _cuda_major()
        candidates = [f"nixl_cu{major}._api"] if major else []
        candidates += [m for m in ("nixl_cu13._api", "nixl_cu12._api", "nixl._api") if m not in candidates]
        errors = []
        for name in candidates:
            try:
                _api = importlib.import_module(name)
            except (ImportError, OSError) as exc:
                errors.append(f"{name}: {exc}")
                continue
            logger.debug("using NIXL from %s", name)
            return _api
        raise TransportError("cannot import NIXL (tried " + "; ".join(errors) + ")")


@dataclass(frozen=True, kw_only=True, slots=True)
class ReadOp:
    """One contiguous (or strided) read: `count` blocks of `nbytes`, each `stride` bytes apart."""

    local_addr: int
    remote_addr: int
    nbytes: int
    count: int = 1
    local_stride: int = 0
    remote_stride: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ReadJob:
    """Everything to pull from one remote agent in one refit."""

    agent_name: str
    ops: Sequence[ReadOp]
    local_device: str = "cpu"
    local_device_id: int = 0
    remote_device: str = "cpu"
    remote_device_id: int = 0
    notif: bytes = b""


def merge_reads(ops: Sequence[ReadOp]) -> list[tuple[int, int, int]]:
    """Expand strided ops and merge ranges that are adjacent on both sides.

    Returns `(local_addr, remote_addr, nbytes)` triples; a fast link pays per descriptor, so a
    sliced plan must not explode into thousands of small reads when its ranges touch.
    """
    flat: list[tuple[int, int, int]] = []
    for op in ops:
        for i in range(op.count):
            flat.append((op.local_addr + i * op.local_stride, op.remote_addr + i * op.remote_stride, op.nbytes))
    flat.sort(key=lambda r: r[1])
    merged: list[list[int]] = []
    for local, remote, n in flat:
        if n <= 0:
            continue
        if merged:
            last = merged[-1]
            if last[0] + last[2] == local and last[1] + last[2] == remote:
                last[2] += n
                continue
        merged.append([local, remote, n])
    return [(a, b, c) for a, b, c in merged]


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
            self._agent = _new_agent(api, self.name)
        except Exception as exc:  # NIXL raises its own exception types from C++
            raise TransportError(f"cannot create NIXL agent {self.name}: {exc}") from exc
        self._registrations: dict[tuple[int, int, str, int], Any] = {}
        self._remotes: dict[str, bytes] = {}
        self._closed = False
        self.num_registrations = 0  # lifetime count, so callers can prove reuse

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

    def registered(self) -> list[tuple[int, int, str, int]]:
        with self._lock:
            return list(self._registrations)

    def metadata(self) -> bytes:
        with self._lock:
            return bytes(self._agent.get_agent_metadata())

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
                raise TransportError(f"cannot load metadata of NIXL agent {agent_name}: {exc}") from exc
            added = added.decode() if isinstance(added, bytes) else str(added)
            if added != agent_name:
                raise TransportError(f"metadata names agent {added!r}, catalog says {agent_name!r}")
            self._remotes[agent_name] = metadata
            try:
                # Connecting now keeps the endpoint set-up (~20 ms) off the first refit.
                self._agent.make_connection(agent_name)
            except Exception:  # a lazy connection on first READ still works
                logger.debug("make_connection(%s) failed; connecting on first read", agent_name, exc_info=True)

    def forget(self, agent_name: str) -> None:
        with self._lock:
            if self._remotes.pop(agent_name, None) is not None:
                self._agent.remove_remote_agent(agent_name)

    # -- transfers ------------------------------------------------------------------------------

    def read(self, jobs: Sequence[ReadJob], *, timeout_s: float = 60.0) -> int:
        """Pull every job (one remote agent each) as one NIXL transfer per job, all in flight at once.

        Returns the number of descriptors posted after merging. Raises TransportError (or
        TransferTimeoutError when the deadline passes); every handle is released either way.
        """
        posted: list[tuple[Any, ReadJob, int]] = []
        total = 0
        deadline = time.monotonic() + timeout_s
        try:
            for job in jobs:
                ranges = merge_reads(job.ops)
                if not ranges:
                    continue
                arr = np.asarray(ranges, dtype=np.uint64)
                n = len(arr)
                local = np.stack([arr[:, 0], arr[:, 2], np.full(n, job.local_device_id, np.uint64)], axis=1)
                remote = np.stack([arr[:, 1], arr[:, 2], np.full(n, job.remote_device_id, np.uint64)], axis=1)
                with self._lock:
                    handle = self._start_read(
                        job.agent_name, local, remote, job.local_device, job.remote_device, job.notif
                    )
                posted.append((handle, job, int(arr[:, 2].sum())))
                total += n
            for handle, job, nbytes in posted:
                self._wait(handle, job.agent_name, deadline, nbytes)
        finally:
            with self._lock:
                for handle, _, _ in posted:
                    self._release(handle)
        return total

    def _start_read(
        self, agent_name: str, local: np.ndarray, remote: np.ndarray, local_dev: str, remote_dev: str, notif: bytes
    ) -> Any:
        mem = {"cpu": "DRAM", "cuda": "VRAM"}
        local_descs = self._agent.get_xfer_descs(local, mem[local_dev])
        remote_descs = self._agent.get_xfer_descs(remote, mem[remote_dev])
        if local_descs is None or remote_descs is None:
            raise TransportError("NIXL rejected the transfer descriptors")
        try:
            handle = self._agent.initialize_xfer("READ", local_descs, remote_descs, agent_name, notif)
            state = self._agent.transfer(handle)
        except Exception as exc:
            raise TransportError(f"READ from {agent_name} could not start: {exc}") from exc
        if state == "ERR":
            self._release(handle)
            raise TransportError(f"READ from {agent_name} failed to post")
        return handle

    def _wait(self, handle: Any, agent_name: str, deadline: float, nbytes: int) -> None:
        sleep = 0.0
        while True:
            with self._lock:
                try:
                    state = self._agent.check_xfer_state(handle)
                except Exception as exc:
                    raise TransportError(f"READ from {agent_name} failed: {exc}") from exc
            if state == "DONE":
                return
            if state == "ERR":
                raise TransportError(f"READ of {nbytes} bytes from {agent_name} failed")
            if time.monotonic() > deadline:
                raise TransferTimeoutError(f"READ of {nbytes} bytes from {agent_name} did not finish in time")
            # Spin briefly, then back off: most reads finish in well under a millisecond per MB.
            if sleep:
                time.sleep(sleep)
            sleep = min(0.002, sleep + 0.00005)

    def _release(self, handle: Any) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception:  # a failed release is queued by NIXL itself; nothing to undo here
            logger.debug("release of a NIXL transfer handle failed", exc_info=True)

    # -- life cycle -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
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

    def __enter__(self) -> NixlAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
