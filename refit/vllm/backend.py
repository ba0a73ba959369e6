"""The `refit` backend of vLLM's weight-transfer API: one instance per vLLM worker (engine TP rank).

vLLM creates it when `weight_transfer_config={"backend": "refit"}` is set (the entry point in
`plugin.py` registers the name in every vLLM process) and drives it with the standard calls:

* `init_weight_transfer_engine({"init_info": {"catalog": "host:port", "name": ..., "replica": ...}})`
  creates this worker's `Receiver` (idempotent for the same settings).
* `start_weight_update()` -> `update_weights({"update_info": {"version": v}})` -> `finish_weight_update()`:
  `update_weights` takes the version staged by a prefetch (or pulls it now), checks that every TP
  rank of the engine holds the same version, and installs it through layerwise reload.

Prefetch runs beside generation: `collective_rpc("weight_transfer_engine", kwargs={"op": "prefetch",
"version": v})` starts a pull on a background thread of each worker and returns at once;
`{"op": "status"}` reports its state. The engine keeps generating on the old weights meanwhile; only
the install needs the pause. Staging is reused (a newer prefetch replaces an uninstalled one): one
buffer holding the rank's whole set when it fits `max_staging_bytes`, else two halves of that window
through which the set streams in chunks of whole layers (the prefetch fills both; the install pulls
the rest, chunk k + 1 while chunk k is installed).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from refit.compat import vllm as vllm_compat
from refit.config import DEFAULT_TIMEOUTS
from refit.engines.vllm import VLLMEngine
from refit.errors import ConfigError, EngineError, RankVersionMismatchError
from refit.receiver import Receiver, StagedVersion
from refit.types import UpdateResult

logger = logging.getLogger(__name__)

# This module exists to subclass vLLM's backend classes: importing it imports vLLM (vLLM itself does).
WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo = vllm_compat.weight_transfer_bases()

_FAILED = -1


# vLLM builds these with `cls(**dict)` and its base classes are plain (non-frozen) dataclasses, so
# these cannot be frozen; treat them as read-only.
@dataclass(kw_only=True)
class RefitInitInfo(WeightTransferInitInfo):
    """`init_info` of the refit backend: where the catalog is and which model to follow."""

    catalog: str
    name: str = "default"
    replica: int = 0
    timeout_s: float = DEFAULT_TIMEOUTS.update_s
    catalog_timeout_s: float = DEFAULT_TIMEOUTS.catalog_s
    # The staging window per worker (None: 1 GiB). A rank's weights that fit it are prefetched whole and
    # installed all at once; larger ones stream through it in chunks of whole layers.
    max_staging_bytes: int | None = None
    # The catalog token (None: each worker's $REFIT_CATALOG_TOKEN); kept out of the repr, so out of logs.
    token: str | None = field(default=None, repr=False)
    # PEM files on the worker's machine for a catalog served over TLS (as `CatalogClient`'s).
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if not self.catalog or self.replica < 0 or self.timeout_s <= 0 or self.catalog_timeout_s <= 0:
            raise ConfigError(f"invalid refit init_info: {self}")
        if self.max_staging_bytes is not None and self.max_staging_bytes <= 0:
            raise ConfigError(
                f"invalid refit init_info: max_staging_bytes must be positive, got {self.max_staging_bytes}"
            )


@dataclass(kw_only=True)
class RefitUpdateInfo(WeightTransferUpdateInfo):
    """`update_info` of the refit backend: the version to install (every TP rank must get the same)."""

    version: int
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or self.version < 0:
            raise ConfigError(f"update_info.version must be a non-negative int, got {self.version!r}")


class RefitWeightTransferEngine(WeightTransferEngine[RefitInitInfo, RefitUpdateInfo]):
    """Pulls versions from a refit catalog into this worker's model (see the module docstring)."""

    init_info_cls = RefitInitInfo
    update_info_cls = RefitUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        tp_size, pp_size = vllm_compat.parallel_sizes(vllm_config)
        if pp_size > 1:
            raise ConfigError("the refit backend supports vLLM tensor parallelism only (pipeline_parallel_size 1)")
        self._tp_rank = vllm_compat.tp_rank()
        self._tp_size = tp_size
        self._receiver: Receiver | None = None
        self._init: RefitInitInfo | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refit-pull", initializer=_unpin)
        self._lock = threading.Lock()
        self._pending: tuple[int, Future[StagedVersion]] | None = None
        self._installed: int | None = None
        self._last: dict[str, Any] = {}

    # -- standard calls ---------------------------------------------------------------------------------

    def init_transfer_engine(self, init_info: RefitInitInfo) -> None:
        if self._init == init_info and self._receiver is not None:
            return
        reserve_fds()
        self._close_receiver()
        model, model_config, device = vllm_compat.update_target(self)
        engine = VLLMEngine(
            model=model, model_config=model_config, tp_rank=self._tp_rank, tp_size=self._tp_size, device=device
        )
        self._receiver = Receiver(
            catalog=init_info.catalog,
            engine=engine,
            name=init_info.name,
            replica=init_info.replica,
            timeout_s=init_info.timeout_s,
            catalog_timeout_s=init_info.catalog_timeout_s,
            max_staging_bytes=init_info.max_staging_bytes,
            token=init_info.token,
            tls_ca=init_info.tls_ca,
            tls_cert=init_info.tls_cert,
            tls_key=init_info.tls_key,
        )
        self._init = init_info
        logger.info(
            "refit backend: TP rank %d/%d follows %r at %s",
            self._tp_rank,
            self._tp_size,
            init_info.name,
            init_info.catalog,
        )

    def start_weight_update(self) -> None:
        self._require_receiver()

    def receive_weights(self, update_info: RefitUpdateInfo) -> None:
        """Install `update_info.version` on this rank, after every TP rank agreed it holds that version.

        Every failure is agreed on by all TP ranks and raised by the last one only: vLLM's executor
        stops reading worker replies at the first error, so an error on an earlier rank would leave
        the later ranks' replies to be read as the answers of the next call.
        """
        receiver = self._require_receiver()
        try:
            result = agree_and_install(
                update_info.version,
                stage=lambda: self._staged(update_info.version, update_info.timeout_s),
                install=receiver.install,
                gather=self._gather,
            )
        except Exception as exc:  # noqa: BLE001 - every rank agreed on it; raised on the last rank only
            return self._fail(exc)
        with self._lock:
            self._pending = None
        self._installed = result.version
        self._last = {
            "version": result.version,
            "bytes": result.bytes,
            "install_s": result.install_seconds,
            "wire_s": result.wire_seconds,
            "fetch_s": result.seconds - result.install_seconds,
            "staging_bytes": result.staging_bytes,
            "chunks": result.chunks,
            "peak_staging_bytes": receiver.stats.peak_staging_bytes,
        }
        return None

    def _fail(self, exc: Exception) -> None:
        """Raise `exc` on the last TP rank; the others log it (see `receive_weights`)."""
        self._last = {"error": str(exc), "error_type": type(exc).__name__}
        if self._tp_rank == self._tp_size - 1:
            raise exc
        logger.error("refit backend: TP rank %d: %s: %s", self._tp_rank, type(exc).__name__, exc)

    def finish_weight_update(self) -> None:
        logger.debug("refit backend: TP rank %d finished an update (v%s)", self._tp_rank, self._installed)

    def shutdown(self) -> None:
        self._close_receiver()

    # -- prefetch and status (through collective_rpc("weight_transfer_engine", kwargs=...)) -------------

    def __call__(self, op: str = "status", **kwargs: Any) -> dict[str, Any]:
        """The control channel vLLM's `collective_rpc` reaches by the worker attribute's name.

        `op="prefetch", version=v` starts pulling `v` in the background; `op="status"` reports.
        Arguments and results are plain JSON values (they also travel through vLLM's HTTP route).
        """
        if op == "prefetch":
            return self.prefetch(int(kwargs["version"]))
        if op == "status":
            return self.status()
        raise ConfigError(f"unknown refit backend op {op!r}; expected 'prefetch' or 'status'")

    def prefetch(self, version: int) -> dict[str, Any]:
        """Start pulling `version` into staging unless it is already pulled or being pulled."""
        self._submit(version)
        return self.status()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tp_rank": self._tp_rank,
            "tp_size": self._tp_size,
            "installed": self._installed,
            "last": dict(self._last),
            "state": "idle",
            "version": None,
            # The weights are a mix of versions: a streamed install began and failed (never serve so).
            "torn": self._receiver.torn if self._receiver is not None else False,
        }
        with self._lock:
            pending = self._pending
        if pending is None:
            return out
        version, future = pending
        out["version"] = version
        if not future.done():
            out["state"] = "pulling"
        elif (exc := future.exception()) is not None:
            out.update(state="failed", error=str(exc), error_type=type(exc).__name__)
        else:
            staged = future.result()
            out.update(
                state="staged",
                bytes=staged.bytes,
                wire_s=staged.timings.get("wire", 0.0),
                fetch_s=sum(staged.timings.values()),
                staging_bytes=staged.staging_bytes,
                chunks=len(staged.plan.chunks) if staged.plan is not None else 1,
                prefetched_chunks=staged.pulled if staged.streamed else 1,
                timings=dict(staged.timings),
            )
        return out

    # -- helpers -------------------------------------------------------------------------------------------

    def _require_receiver(self) -> Receiver:
        if self._receiver is None:
            raise ConfigError("call init_weight_transfer_engine with the refit catalog's address first")
        return self._receiver

    def _submit(self, version: int) -> Future[StagedVersion]:
        """The pull of `version`: the one pending, or a new one unless it is pending or its pull failed."""
        receiver = self._require_receiver()
        with self._lock:
            if self._pending is None or self._pending[0] != version or _failed(self._pending[1]):
                self._pending = (version, self._pool.submit(receiver.fetch, version))
            return self._pending[1]

    def _staged(self, version: int, timeout_s: float | None) -> StagedVersion:
        """The prefetched `version`, waiting for a pull in flight, or a pull started now."""
        future = self._submit(version)
        if timeout_s is None:
            timeout_s = self._init.timeout_s if self._init is not None else DEFAULT_TIMEOUTS.update_s
        t0 = time.monotonic()
        # The fetch enforces its own deadline; this one only guards against a hung pull thread.
        staged = future.result(timeout=timeout_s + DEFAULT_TIMEOUTS.grace_s)
        logger.debug(
            "refit backend: TP rank %d had v%d staged after %.3fs", self._tp_rank, version, time.monotonic() - t0
        )
        return staged

    def _gather(self, version: int) -> list[int]:
        """Every TP rank's `version` (-1: that rank failed), over the TP group's CPU process group."""
        if self._tp_size == 1:
            return [version]
        import torch.distributed as dist

        mine = torch.tensor([version], dtype=torch.int64)
        everyone = [torch.zeros_like(mine) for _ in range(self._tp_size)]
        dist.all_gather(everyone, mine, group=vllm_compat.tp_cpu_group())
        return [int(t.item()) for t in everyone]

    def _close_receiver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            try:
                timeout_s = self._init.timeout_s if self._init else DEFAULT_TIMEOUTS.update_s
                pending[1].result(timeout=timeout_s + DEFAULT_TIMEOUTS.grace_s)
            except Exception:
                logger.debug("refit backend: discarded pull of v%d failed", pending[0], exc_info=True)
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        self._init = None


def _failed(future: Future[StagedVersion]) -> bool:
    return future.done() and future.exception() is not None


def agree_and_install(
    version: int,
    *,
    stage: Callable[[], StagedVersion],
    install: Callable[[StagedVersion], UpdateResult],
    gather: Callable[[int], list[int]],
) -> UpdateResult:
    """One TP rank's part of an install that every rank of the engine agrees on; raises on failure.

    Three agreements, each one `gather` (an all-gather of one int over the TP group), so every rank
    makes the same calls whatever fails: the requested version (ranks asked for different versions:
    nothing is pulled or installed), the staged version (a rank that could not stage it: nothing is
    installed), and the install's outcome. A rank raises its own error if it has one, else an
    `EngineError` naming the ranks that failed.
    """
    requested = gather(version)
    if len(set(requested)) != 1:
        raise RankVersionMismatchError(
            f"TP ranks of this engine were asked for versions {requested}; nothing pulled or installed"
        )
    staged: StagedVersion | None = None
    error: Exception | None = None
    try:
        staged = stage()
    except Exception as exc:  # noqa: BLE001 - every rank must still reach the agreement below
        error = exc
    held = gather(staged.version if staged is not None else _FAILED)
    if staged is None or held != requested:
        failed = [rank for rank, v in enumerate(held) if v != version]
        raise error or EngineError(f"TP ranks {failed} could not stage v{version}")
    result: UpdateResult | None = None
    try:
        result = install(staged)
    except Exception as exc:  # noqa: BLE001 - agreed on below
        error = exc
    outcomes = gather(_FAILED if result is None else 0)
    if result is None or _FAILED in outcomes:
        failed = [rank for rank, v in enumerate(outcomes) if v == _FAILED]
        raise error or EngineError(f"TP ranks {failed} failed to install v{version}")
    return result


__all__ = ["RefitInitInfo", "RefitUpdateInfo", "RefitWeightTransferEngine", "agree_and_install"]


# Slots this worker's fd table is grown to before its first pull (see `reserve_fds`).
FD_RESERVE = 4096


def reserve_fds(slots: int = FD_RESERVE) -> None:
    """Grow this process's fd table to `slots` (at most RLIMIT_NOFILE) now, on the worker's main thread.

    Growing the fd table of a multi-threaded process waits for an RCU grace period
    (`expand_files` -> `synchronize_rcu`). A first pull's NIXL agent grows it in UCX's progress thread,
    inside `accept` of its own loopback connection and holding the UCP worker lock; with every core busy
    (each vLLM worker's pinned main thread busy-waits after each call, UCX threads spin on that lock),
    the kernel thread that ends grace periods starved for up to minutes ("rcu_preempt kthread starved"
    in dmesg) and the prefetch with it. Here, in an engine call, nothing of this worker spins.
    """
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = min(slots, soft) - 1
    try:
        os.fstat(top)
        return  # open already: the table is at least that large
    except OSError:
        pass
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(fd, top)  # the table grows to hold `top`; fds stay allocated lowest-first
        os.close(top)
    finally:
        os.close(fd)


def _unpin() -> None:
    """Let the pull thread run on any CPU of this machine.

    vLLM's CPU workers bind their threads to one core each (`VLLM_CPU_OMP_THREADS_BIND`), and a new
    thread inherits that binding: the pull (first NIXL agent, registration, READs) then fights the
    worker's own busy threads for one core, which took a first prefetch from 0.6 s to a minute.
    """
    try:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    except (AttributeError, OSError, ValueError):  # not Linux, or a cpuset forbids it: keep the binding
        logger.debug("could not widen the pull thread's CPU affinity", exc_info=True)
