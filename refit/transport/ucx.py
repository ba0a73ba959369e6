"""The process-wide settings of NIXL and UCX: refit's UCX defaults, the progress thread's delay, and
NIXL's Python API, imported once after those defaults are applied (`refit.transport.nixl` uses them).
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType

from refit.compat import nixl as compat
from refit.errors import ConfigError

logger = logging.getLogger(__name__)

_api_lock = threading.Lock()
_api: ModuleType | None = None

# UCX settings refit needs for a fast pull; each applies only when the user has not set it.
UCX_DEFAULTS: dict[str, str] = {
    # vLLM sets this before importing NIXL to avoid a rare UCX registration-cache leak.
    "UCX_RCACHE_MAX_UNRELEASED": "1024",
    # NIXL logs every agent's creation at INFO to stdout, which would mix into callers' output.
    "NIXL_LOG_LEVEL": "WARN",
    # Not set here: UCX_TCP_CONN_NB=y. UCX's TCP connect blocks by default, inside NIXL's
    # add_remote_agent/make_connection, so a first connect to a peer whose SYNs go unanswered (a
    # partition) waits out the kernel's SYN timeout (~130 s); non-blocking, it fails over within refit's
    # deadlines instead. But with it, vLLM (CPU) workers' connects to trainer ranks never completed in
    # our tests (tests/integration/test_vllm_backend.py hung until its deadline, every run), so it stays
    # the user's choice (docs/reliability.md, "Chaos").
    # Over TCP a READ is served by the source's UCP in software (TCP has no get_zcopy): each request
    # is answered by a reply request, and UCX aborts the whole process (ucp_request.inl: "Fatal:
    # unexpected error: Endpoint timeout") when its keepalive has failed the reader's endpoint while
    # replies are queued: a trainer that resumes after a stall, its reader killed meanwhile. Without
    # UCP keepalive the dead reader's endpoint fails by TCP (reset, or TCP keepalive) and the trainer
    # lives; refit bounds every wait itself and needs no keepalive (docs/reliability.md, Chaos).
    "UCX_KEEPALIVE_INTERVAL": "inf",
    # A thread waiting for a UCP worker's lock sleeps instead of spinning. A receiver's first NIXL
    # agent accepts its own loopback connection in UCX's progress thread, holding the worker lock; when
    # that accept grows the process's fd table the kernel waits for an RCU grace period, and a pull
    # thread spinning on the lock meanwhile kept the CPU from the kernel thread that ends the grace
    # period (2 vLLM CPU workers on 2 cores; docs/vllm.md, "Stall time vs wire time").
    "UCX_USE_MT_MUTEX": "y",
}
UCX_CUDA_DEFAULTS: dict[str, str] = {
    # Without NVLink, UCX disables cuda_ipc get_zcopy and a READ falls to ~0.5 GB/s (vs ~1.5 TB/s).
    "UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y",
}


def apply_ucx_defaults(environ: dict[str, str] | None = None, *, cuda: bool | None = None) -> dict[str, str]:
    """Set refit's UCX defaults where unset; returns the values that were applied."""
    env = os.environ if environ is None else environ
    wanted = dict(UCX_DEFAULTS)
    if cuda if cuda is not None else _cuda_devices():
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
PROGRESS_DELAY_ENV = "REFIT_NIXL_PROGRESS_DELAY_US"
DEFAULT_PROGRESS_DELAY_US = 1000


def progress_delay_us(environ: dict[str, str] | None = None) -> int:
    """The progress-thread delay for a new agent: `REFIT_NIXL_PROGRESS_DELAY_US`, read when an agent is made."""
    raw = (os.environ if environ is None else environ).get(PROGRESS_DELAY_ENV, str(DEFAULT_PROGRESS_DELAY_US))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{PROGRESS_DELAY_ENV} must be a whole number of microseconds >= 0, got {raw!r}")
    return value


def _cuda_major() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    version = getattr(torch.version, "cuda", None)
    return int(version.split(".")[0]) if version else None


def _cuda_devices() -> bool:
    """A CUDA build of torch that sees a GPU. PyPI's default torch is a CUDA build on CPU-only hosts too,
    where UCX has no cuda_ipc transport and prints a warning about the unused CUDA setting to stdout."""
    if _cuda_major() is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def load_nixl_api() -> ModuleType:
    """Import NIXL's Python API (once), after applying refit's UCX defaults.

    The wheel is chosen by the CUDA build of the torch in this process (`refit.compat.nixl`), so the
    same code works on CPU-only and GPU machines.
    """
    global _api
    with _api_lock:
        if _api is None:
            apply_ucx_defaults()
            _api = compat.import_api(_cuda_major())
        return _api
