"""A persistent pool of trainer processes joined by a gloo process group, driven from the test.

Owns process lifecycle (spawn, rendezvous, shutdown that never hangs), the CPU shims that let
megatron-core 0.16.1 run without CUDA, and the command protocol: `TrainerCluster.run(target,
**kwargs)` calls `target` ("package.module:function") on every rank as
`fn(state, rank, world_size, **kwargs)` and returns the per-rank results in rank order. `state` is
a dict each worker keeps across commands, so a model built by one command is used by the next.

Rendezvous uses a TCPStore hosted by the test process on a port the OS picks (no free-port race);
MASTER_ADDR / MASTER_PORT are still exported in the workers and point at it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import multiprocessing as mp
import os
import pickle
import queue
import sys
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

_READY = -1  # sequence number of the start-up message


class ClusterError(RuntimeError):
    """A command failed on some ranks or timed out; the message carries every rank's story."""


def resolve(target: str) -> Callable[..., Any]:
    """`"package.module:function"` -> the function."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    fn: Any = importlib.import_module(module)
    for part in attr.split("."):
        fn = getattr(fn, part)
    return fn


def apply_cpu_shims() -> None:
    """Make megatron-core 0.16.1 run on a CPU-only torch (megatron.md section 5.2).

    * RotaryEmbedding (and the MoE router) move tensors to `torch.cuda.current_device()`.
    * DotProductAttention enters `get_cuda_rng_tracker().fork()`, which needs CUDA RNG state; the
      tracker class is patched so every tracker (also ones created after a reset) is a no-op.
    * The MoE router's `RouterGatingLinearFunction` names `te_general_gemm`, which `moe_utils` binds
      only when Transformer Engine imports (NameError otherwise); bound to None it takes the plain
      torch matmul path.
    The causal mask (`get_default_causal_mask` builds it on "cuda") is avoided by passing an
    explicit mask in the forward pass instead of a shim.
    """
    from megatron.core.tensor_parallel import random as mpu_random
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    mpu_random.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()  # type: ignore[method-assign]
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _TorchOnCpu:
    """The `torch` module as megatron-core's optimizer modules see it under `apply_optimizer_cpu_shims`:
    every attribute is torch's own, except that a tensor factory asked for `device="cuda"` builds on the CPU."""

    _FACTORIES = frozenset({"tensor", "zeros", "ones", "empty", "full"})

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args: Any, **kwargs: Any) -> Any:
            device = kwargs.get("device")
            if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


def apply_optimizer_cpu_shims() -> None:
    """Let megatron-core 0.16.1's DistributedOptimizer (and its Float16 / chained relatives) run on CPU.

    Besides `apply_cpu_shims`, on top of which it runs:
    * Its scalars (found-inf flag, scale, grad-norm buffers) are built with `device="cuda"` in
      `optimizer.py`, `clip_grads.py`, `grad_scaler.py` and `utils.local_multi_tensor_l2_norm`:
      those modules see a `torch` whose tensor factories put such tensors on the CPU.
    * It accepts only parameters whose `type()` is `torch.cuda.{BFloat16,Half,Float}Tensor`: a
      CPU parameter's `type()` (no arguments) answers with the CUDA name. Only `Parameter.type` is
      touched; plain tensors and `type(dtype)` conversions are torch's own.
    Everything the optimizer computes (the Adam step on fp32 main params, the copy into the bf16
    shards, the DDP reduce-scatter and all-gather over gloo) is megatron-core's own code. Idempotent.
    """
    import importlib

    for name in (
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.distrib_optimizer",
        "megatron.core.optimizer.clip_grads",
        "megatron.core.optimizer.grad_scaler",
        "megatron.core.utils",
    ):
        module = importlib.import_module(name)
        if not isinstance(module.torch, _TorchOnCpu):
            module.torch = _TorchOnCpu(module.torch)
    if getattr(torch.nn.Parameter.type, "_refit_cpu_shim", False):
        return
    real_type = torch.Tensor.type

    def cuda_named_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or self.device.type != "cpu":
            return real_type(self, *args, **kwargs)
        return real_type(self).replace("torch.", "torch.cuda.", 1)

    cuda_named_type._refit_cpu_shim = True  # type: ignore[attr-defined]
    torch.nn.Parameter.type = cuda_named_type  # type: ignore[method-assign]


def _send(results: Any, seq: int, rank: int, ok: bool, value: Any) -> None:
    """Pickle here, not in the queue's feeder thread, so an unpicklable result becomes an error."""
    try:
        payload = pickle.dumps(value)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is reported to the test
        ok, payload = False, pickle.dumps(f"result of rank {rank} is not picklable: {exc!r}")
    results.put((seq, rank, ok, payload))


def _worker(
    rank: int, world_size: int, port: int, pg_timeout_s: float, commands: Any, results: Any, cuda: bool = False
) -> None:
    """Worker entry point: join the process group, then serve commands until told to stop.

    `cuda`: the rank uses GPU `rank` and NCCL (no CPU shims); otherwise the GPUs are hidden and gloo is used.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    if not cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)
    parent = os.getppid()
    try:
        import warnings

        # Known, harmless on CPU: missing TE/Apex fallbacks, CUDA tuning hints, torch deprecations inside megatron.
        for text in ("Transformer Engine", "Apex", "CUDA_DEVICE_MAX_CONNECTIONS", "all_gather_into_tensor"):
            warnings.filterwarnings("ignore", message=f".*{text}")
        store = dist.TCPStore(
            "127.0.0.1", port, world_size=None, is_master=False, timeout=datetime.timedelta(seconds=pg_timeout_s)
        )
        if cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
            **({"device_id": torch.device("cuda", rank)} if cuda else {}),
        )
        if not cuda:
            apply_cpu_shims()
    except BaseException:  # noqa: BLE001 - reported to the test, then the worker exits
        _send(results, _READY, rank, False, traceback.format_exc())
        return
    _send(results, _READY, rank, True, os.getpid())

    state: dict[str, Any] = {}
    while True:
        try:
            msg = commands.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test process died: do not linger
                break
            continue
        if msg is None:
            break
        seq, target, kwargs = pickle.loads(msg)
        try:
            value = resolve(target)(state, rank, world_size, **kwargs)
        except BaseException:  # noqa: BLE001 - any failure goes back to the test with its traceback
            _send(results, seq, rank, False, traceback.format_exc())
        else:
            _send(results, seq, rank, True, value)
    state.clear()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    # Every answer this worker sent has been read by the test (run() waits for all of them), so
    # skip the slow interpreter teardown of torch + megatron: flush and leave.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class TrainerCluster:
    """`world_size` spawned processes in one gloo group (NCCL, a GPU each, if `cuda`), each serving `run` commands.

    Use as a context manager. `timeout_s` bounds start-up (spawn, imports, rendezvous);
    `pg_timeout_s` is the gloo collective timeout inside the workers. After a command times out,
    or a worker dies, the cluster is broken: it is killed and every later `run` raises at once.
    `run` is not thread-safe: drive a cluster from one thread.
    """

    def __init__(
        self,
        world_size: int = 8,
        timeout_s: float = 180.0,
        pg_timeout_s: float = 300.0,
        cuda: bool = False,
        daemon: bool = True,
    ) -> None:
        self.world_size = world_size
        self.cuda = cuda
        # daemon=False: the workers may start processes of their own (Megatron's inference coordinator),
        # which daemonic processes may not; `close` still terminates them.
        self.daemon = daemon
        self.timeout_s = timeout_s
        self.pg_timeout_s = pg_timeout_s
        self.startup_s: float | None = None
        self.pids: list[int] = []
        self._procs: list[Any] = []
        self._commands: list[Any] = []
        self._results: Any = None
        self._store: dist.TCPStore | None = None
        self._seq = 0
        self._broken: str | None = None

    # lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> TrainerCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> TrainerCluster:
        if self._procs:
            raise RuntimeError("cluster already started")
        t0 = time.monotonic()
        ctx = mp.get_context("spawn")
        self._store = dist.TCPStore(
            "127.0.0.1",
            0,
            world_size=None,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=self.pg_timeout_s),
        )
        self._results = ctx.Queue()
        self._commands = [ctx.Queue() for _ in range(self.world_size)]
        # Workers inherit the environment at spawn: keep their torch single-threaded from import on.
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            for rank in range(self.world_size):
                proc = ctx.Process(
                    target=_worker,
                    args=(
                        rank,
                        self.world_size,
                        self._store.port,
                        self.pg_timeout_s,
                        self._commands[rank],
                        self._results,
                        self.cuda,
                    ),
                    name=f"trainer-rank{rank}",
                    daemon=self.daemon,
                )
                proc.start()
                self._procs.append(proc)
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        try:
            self.pids = self._collect(_READY, self.timeout_s, "start-up")
        except BaseException:
            self.close()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def close(self, grace_s: float = 10.0) -> None:
        """Ask workers to exit, then terminate / kill whatever is left. Never blocks for long."""
        if not self._procs:
            return
        if self._broken is None:
            for q in self._commands:
                with contextlib.suppress(Exception):
                    q.put(None)
        deadline = time.monotonic() + grace_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        for q in [*self._commands, self._results]:
            q.cancel_join_thread()
            q.close()
        self._procs, self._commands, self._results, self._store = [], [], None, None
        self._broken = self._broken or "closed"

    # chaos -------------------------------------------------------------------------------------
    def kill(self, rank: int, sig: int = 9) -> None:
        """Send `sig` (SIGKILL by default) to one worker, between commands. A killed worker never
        answers again: the next `run` breaks the cluster, so a test only closes it afterwards."""
        os.kill(self.pids[rank], sig)

    def wait_dead(self, rank: int, timeout_s: float = 30.0) -> None:
        """Wait until a worker has exited (reaped), or raise ClusterError."""
        self._procs[rank].join(timeout_s)
        if self._procs[rank].is_alive():
            raise ClusterError(f"rank {rank} (pid {self.pids[rank]}) is still alive after {timeout_s:g}s")

    def alive(self, rank: int) -> bool:
        return bool(self._procs) and self._procs[rank].is_alive()

    # commands ------------------------------------------------------------------------------
    def run(self, target: str, timeout_s: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run `target` on every rank; per-rank results in rank order.

        Raises `ClusterError` with every failing rank's traceback if any rank raised, and with the
        ranks that did not answer if some did not within `timeout_s` (the cluster is then killed).
        """
        if self._broken is not None:
            raise ClusterError(f"cluster is not usable: {self._broken}")
        resolve(target)  # fail fast, here, on a typo
        self._seq += 1
        # Pickle here: a queue pickles in a background thread, where a failure would only be logged.
        command = pickle.dumps((self._seq, target, kwargs))
        for q in self._commands:
            q.put(command)
        return self._collect(self._seq, timeout_s, target)

    def _collect(self, seq: int, timeout_s: float, what: str) -> list[Any]:
        """Wait for one answer per rank; after a failure, give the others a short grace period."""
        answers: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout_s
        dead: dict[int, int | None] = {}
        while len(answers) < self.world_size:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                got_seq, rank, ok, payload = self._results.get(timeout=min(0.5, deadline - now))
            except queue.Empty:
                dead = {r: p.exitcode for r, p in enumerate(self._procs) if r not in answers and not p.is_alive()}
                if dead:
                    break
                continue
            if got_seq != seq:
                continue  # a late answer to an earlier command: cannot happen unless broken
            answers[rank] = (ok, pickle.loads(payload))
            if not ok:  # the others may be stuck in a collective with this rank: do not wait long
                deadline = min(deadline, time.monotonic() + min(30.0, timeout_s))
        failed = {r: v for r, (ok, v) in sorted(answers.items()) if not ok}
        missing = [r for r in range(self.world_size) if r not in answers]
        if not failed and not missing:
            return [answers[r][1] for r in range(self.world_size)]
        lines = [f"{what} failed on ranks {sorted(failed)}" if failed else f"{what}: no rank raised"]
        if missing:
            why = f"died (exit codes {dead})" if dead else f"no answer within {timeout_s:.0f}s"
            lines.append(f"ranks {missing} {why}; the cluster is killed")
            self._broken = f"{what}: ranks {missing} did not answer"
            self.close(grace_s=0.0)
        for rank, tb in failed.items():
            lines.append(f"--- rank {rank} ---\n{tb}")
        raise ClusterError("\n".join(lines))
