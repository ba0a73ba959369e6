"""Ceilings and baselines, measured in the same run as the thing they judge.

- `copy_ceiling`: the physical limit of moving bytes in one process (a single-threaded memcpy on
  CPU, a device-to-device copy on GPU).
- `Source` (a worker) + `nixl_read`: raw bulk NIXL READ between two processes, through refit's own
  transport defaults, as one descriptor or split into many; `read_from_source` sets both up for the
  GPU probes of bench/scripts.
- `broadcast`: `torch.distributed` broadcast (gloo on CPU, NCCL where two GPUs exist), what a user
  would otherwise pick.
- `ipc_copy`: a CUDA IPC handle + copy, what colocated refits use.
"""

from __future__ import annotations

import base64
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from refit.dtypes import device_of
from refit.transport.nixl import NixlAgent, ReadJob, ReadOp


@dataclass(frozen=True, kw_only=True, slots=True)
class Sample:
    """Repeated timings of moving `nbytes`."""

    what: str
    nbytes: int
    seconds: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def gbps(self) -> float:
        """Median rate, GB/s (1e9 bytes)."""
        return self.nbytes / self.median_s / 1e9

    @property
    def best_gbps(self) -> float:
        return self.nbytes / min(self.seconds) / 1e9

    def line(self, width: int = 60) -> str:
        """One line for a person: what, median milliseconds and GB/s."""
        return f"{self.what:<{width}} {self.median_s * 1e3:8.2f} ms  {self.gbps:8.1f} GB/s"

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "bytes": self.nbytes,
            "median_s": self.median_s,
            "gbps": round(self.gbps, 3),
            "best_gbps": round(self.best_gbps, 3),
            "runs": len(self.seconds),
        }


def torch_device(name: str, index: int = 0) -> torch.device:
    """The torch device of a `--device` choice ("cpu" or "cuda") and a GPU index."""
    return torch.device(f"cuda:{index}") if name == "cuda" else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(what: str, nbytes: int, fn: Callable[[], None], *, iters: int, warmup: int = 1) -> Sample:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return Sample(what=what, nbytes=nbytes, seconds=tuple(runs))


def gpu_ms(fn: Callable[[], object], iters: int) -> float:
    """Median GPU time of `fn` in ms by CUDA events on the current stream, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def filled(nbytes: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A byte buffer with a cheap, non-constant pattern (so a missed transfer shows)."""
    period = 251 * 4096  # a prime period of bytes, tiled: wrong offsets show, and no int64 temporary of nbytes
    tile = torch.arange(period, dtype=torch.int64, device=device).add_(seed).remainder_(251).to(torch.uint8)
    reps = -(-nbytes // period)
    return tile.repeat(reps)[:nbytes].clone()


def copy_ceiling(nbytes: int, device: torch.device, *, iters: int, source: torch.device | None = None) -> Sample:
    """Copy `nbytes` within one process: numpy's single-threaded memcpy on CPU, copy_ on GPU.

    With `source` another GPU, the copy crosses devices (peer-to-peer over NVLink where present).
    """
    if device.type == "cpu":
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        return timed("memcpy (1 thread)", nbytes, lambda: np.copyto(dst, src), iters=iters)
    source = source or device
    src = torch.ones(nbytes, dtype=torch.uint8, device=source)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy() -> None:
        dst.copy_(src)
        sync(device)
        sync(source)

    what = "device-to-device copy" if source == device else f"GPU-to-GPU copy ({source} -> {device})"
    return timed(what, nbytes, copy, iters=iters)


def link_bound_s(
    bytes_by_rank: dict[int, int], *, gpus: int, receiver_gpu: int, peer_gbps: float, local_gbps: float
) -> float:
    """The least time the links allow a receiver on GPU `receiver_gpu` to pull `bytes_by_rank` from
    trainer ranks placed round-robin on `gpus` GPUs (rank r on GPU r % gpus, as the bench places them):
    each GPU's bytes at its link's same-run copy rate (`local_gbps` for the receiver's own GPU,
    `peer_gbps` for another), all links at once (measured: reading 8 GiB across NVLink and 8 GiB from
    its own GPU at once takes as long as the NVLink half alone, bench/scripts/two_sources.py)."""
    per_gpu: dict[int, int] = {}
    for rank, nbytes in bytes_by_rank.items():
        per_gpu[rank % gpus] = per_gpu.get(rank % gpus, 0) + nbytes
    return max((n / ((local_gbps if g == receiver_gpu else peer_gbps) * 1e9) for g, n in per_gpu.items()), default=0.0)


# -- the source side: runs in a worker process ---------------------------------------------------------


class Source:
    """A worker holding one registered buffer others read from (and broadcast from, as rank 0)."""

    def __init__(self, *, device: str, device_index: int = 0, world: int = 0, port: int = 0, backend: str = "gloo"):
        torch.set_num_threads(1)
        self.device = torch_device(device, device_index)
        if device == "cuda":
            torch.cuda.set_device(self.device)
        self.agent = NixlAgent(prefix="bench-source")
        self.buf: torch.Tensor | None = None
        if world:  # `port`: the parent's `procs.rendezvous()` store; the parent is rank 1
            from refit_bench.procs import join_group

            join_group(backend, rank=0, world_size=world, port=port)

    def __call__(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg["cmd"]
        if cmd == "alloc":
            if self.buf is not None:
                dev, dev_id = device_of(self.buf)
                self.agent.deregister(self.buf.data_ptr(), self.buf.numel(), device=dev, device_id=dev_id)
            self.buf = filled(msg["nbytes"], self.device, seed=msg.get("seed", 0))
            dev, dev_id = device_of(self.buf)
            self.agent.register(self.buf.data_ptr(), self.buf.numel(), device=dev, device_id=dev_id)
            return {"agent": self.agent.name, "metadata": base64.b64encode(self.agent.metadata()).decode(),
                    "addr": self.buf.data_ptr(), "device": dev, "device_id": dev_id}  # fmt: skip
        if cmd == "bcast":
            import torch.distributed as dist

            for _ in range(msg["iters"] + 1):
                dist.broadcast(self.buf[: msg["nbytes"]], src=0)
                sync(self.device)
            return {}
        if cmd == "ipc":
            return {"handle": _share_cuda(self.buf)}
        raise ValueError(f"unknown command {cmd!r}")


@contextlib.contextmanager
def read_from_source(
    nbytes: int, local: torch.device, *, prefix: str
) -> Iterator[tuple[NixlAgent, dict[str, Any], torch.Tensor]]:
    """A `Source` worker on GPU 0 holding `nbytes` (seed 3), and this process's NIXL agent connected
    to it with a registered destination of `nbytes` on `local`: (agent, the source's `alloc` answer,
    destination). Both are closed on exit."""
    from refit_bench.procs import Worker

    source = Worker("refit_bench.measure:Source", device="cuda", device_index=0)
    agent = NixlAgent(prefix=prefix)
    try:
        source.wait_started()
        info = source.call(cmd="alloc", nbytes=nbytes, seed=3)
        agent.connect(info["agent"], base64.b64decode(info["metadata"]))
        dst = torch.empty(nbytes, dtype=torch.uint8, device=local)
        dev, dev_id = device_of(dst)
        agent.register(dst.data_ptr(), nbytes, device=dev, device_id=dev_id)
        yield agent, info, dst
    finally:
        agent.close()
        source.close()


def _share_cuda(t: torch.Tensor) -> list[Any]:
    """The storage's CUDA IPC handle as JSON-safe values (bytes as base64)."""
    parts = t.untyped_storage()._share_cuda_()
    return [{"b64": base64.b64encode(p).decode()} if isinstance(p, bytes) else p for p in parts]


def _open_cuda(handle: list[Any]) -> torch.Tensor:
    parts = [base64.b64decode(p["b64"]) if isinstance(p, dict) else p for p in handle]
    storage = torch.UntypedStorage._new_shared_cuda(*parts)
    return torch.empty(0, dtype=torch.uint8, device=f"cuda:{parts[0]}").set_(storage)


# -- the reading side: this process -------------------------------------------------------------------


def nixl_read(
    agent: NixlAgent, dst: torch.Tensor, source: dict[str, Any], nbytes: int, *, descriptors: int = 1, iters: int
) -> Sample:
    """READ `nbytes` of a Source's buffer into `dst` (registered by the caller), as `descriptors` pieces."""
    agent.connect(source["agent"], base64.b64decode(source["metadata"]))
    step = -(-nbytes // descriptors)
    ops = [
        ReadOp(local_addr=dst.data_ptr() + a, remote_addr=source["addr"] + a, nbytes=min(step, nbytes - a))
        for a in range(0, nbytes, step)
    ]
    local_device, local_device_id = device_of(dst)
    job = ReadJob(
        agent_name=source["agent"], ops=ops, local_device=local_device, local_device_id=local_device_id,
        remote_device=source["device"], remote_device_id=source["device_id"],
    )  # fmt: skip
    what = "NIXL READ" + (f" ({len(ops)} descriptors)" if len(ops) > 1 else "")
    sample = timed(what, nbytes, lambda: agent.read([job], timeout_s=600), iters=iters)
    sync(dst.device)
    return sample


def broadcast(dst: torch.Tensor, nbytes: int, *, iters: int, backend: str) -> Sample:
    """Receive a broadcast from the Source (rank 0); the Source must run `bcast` concurrently."""
    import torch.distributed as dist

    def once() -> None:
        dist.broadcast(dst[:nbytes], src=0)
        sync(dst.device)

    return timed(f"torch.distributed broadcast ({backend})", nbytes, once, iters=iters)


def ipc_copy(dst: torch.Tensor, handle: list[Any], nbytes: int, *, iters: int) -> Sample:
    src = _open_cuda(handle)

    def copy() -> None:
        dst[:nbytes].copy_(src[:nbytes])
        sync(dst.device)

    return timed("CUDA IPC handle + copy", nbytes, copy, iters=iters)
