"""The processes of `refit-bench refit` (and the trainers of `refit-bench vllm`): trainer ranks with a
Megatron GPTModel and a Publisher, receiver ranks with an engine of plain tensors and a Receiver, and
the classic gather + broadcast baseline. Each runs in its own process (`refit_bench.procs.Worker`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from refit_bench import measure
from refit_bench.procs import join_group
from refit_bench.synthetic import SHAPES

NAME = "bench"  # the catalog model name every bench run publishes under


# -- workers ----------------------------------------------------------------------------------------


class TrainerRank:
    """One trainer process: a Megatron GPTModel and a Publisher."""

    def __init__(
        self, *, rank: int, world: int, port: int, tp: int, pp: int, shape: str, device: str, catalog: str, ep: int = 1,
        etp: int | None = None, row_blocks: int = 1,
    ) -> None:  # fmt: skip
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # no Apex / TE: expected
        from refit_bench.synthetic import build_gpt, init_trainer_rank

        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        init_trainer_rank(rank, world, port, tp=tp, pp=pp, ep=ep, etp=etp)
        torch.manual_seed(1234 + rank)
        self.model = build_gpt(SHAPES[shape], device=device)
        self.catalog = catalog
        self.row_blocks = row_blocks
        self.pub: Any = None

    def __call__(self, msg: dict[str, Any]) -> dict[str, Any]:
        from refit import Publisher

        if msg["cmd"] == "register":
            t0 = time.perf_counter()
            self.pub = Publisher(catalog=self.catalog, model=self.model, name=NAME, row_blocks=self.row_blocks)
            return {"seconds": time.perf_counter() - t0, "registrations": self.pub.num_registrations}
        if msg["cmd"] == "publish":
            t0 = time.perf_counter()
            if msg["version"] > 1:
                self.pub.invalidate()  # readers of the old version discard it
                with torch.no_grad():
                    for p in self.model.parameters():
                        p.mul_(0.5)  # stands in for an optimizer step: every tensor changes
            info = self.pub.stream_weights(msg["version"])
            return {"seconds": time.perf_counter() - t0, "state": info.state.value,
                    "registrations": self.pub.num_registrations, "digest_s": self.pub.last_digest_seconds}  # fmt: skip
        raise ValueError(msg["cmd"])


class BufferEngine:
    """An engine rank that is just the tensors it serves: the planner's targets, allocated once."""

    def __init__(self, spec: Any, shapes: dict[str, Any], device: torch.device) -> None:
        from refit.dtypes import torch_dtype

        self._spec, self._device = spec, device
        self.tensors = {n: torch.empty(s.shape, dtype=torch_dtype(s.dtype), device=device) for n, s in shapes.items()}

    def spec(self) -> Any:
        return self._spec

    def expected(self) -> dict[str, Any]:
        from refit.engines.base import specs_of

        return specs_of(self.tensors)

    @property
    def device(self) -> torch.device:
        return self._device

    def destinations(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)  # streamed installs and direct reads write these, as HF and Megatron engines

    def install(self, tensors: dict[str, torch.Tensor]) -> None:
        from refit.engines.base import install_tensors

        install_tensors(self.tensors, tensors)  # the library's all-or-nothing install, as HF and Megatron use


class ReceiverRank:
    """One engine rank: a BufferEngine shaped from the catalog, and a Receiver."""

    def __init__(
        self, *, catalog: str, tp_rank: int, tp_size: int, ep_size: int, replica: int, device: str, gpu: int = 0,
        scheme: str = "hf", max_staging_bytes: int | None = None, direct: bool = True, verify: bool = True,
        threads: int = 0, direct_min_bytes: int | None = None, gpu_timeline: bool = False,
    ) -> None:  # fmt: skip
        if threads > 0:
            torch.set_num_threads(threads)  # beside the receiver's own pull threads, on a machine shared with trainers
        self.catalog, self.tp_rank, self.tp_size, self.replica = catalog, tp_rank, tp_size, replica
        self.max_staging_bytes, self.direct, self.verify = max_staging_bytes, direct, verify
        self.direct_min_bytes = direct_min_bytes
        self.ep_size, self.scheme = ep_size, scheme
        self.device = measure.torch_device(device, gpu)
        if device == "cuda":
            torch.cuda.set_device(self.device)
        self.rcv: Any = None
        self.gpu_timeline = gpu_timeline
        self.timeline: Any = None  # `gpu_timeline.Timeline`, from the second refit on

    def _setup(self) -> None:
        from refit import Receiver
        from refit.catalog.client import CatalogClient
        from refit.engines.base import EngineSpec, TensorSpec
        from refit.plan import cost
        from refit.plan.planner import plan_refit

        with CatalogClient(self.catalog) as client:
            info = client.wait_ready(name=NAME, version=1, timeout_s=600)
            sources = client.get_sources(name=NAME, version=1)
        # Engine EP spreads whole experts over the engine's TP ranks (vLLM's expert parallelism).
        experts = dict(ep_rank=self.tp_rank, ep_size=self.ep_size, expert_tp_size=1) if self.ep_size > 1 else {}
        spec = EngineSpec.from_meta(info.model, tp_rank=self.tp_rank, tp_size=self.tp_size, scheme=self.scheme,
                                    **experts)  # fmt: skip
        # Its tensors are the planner's targets of the model at the layout the Receiver plans with,
        # as a vLLM engine learns its own; the Receiver then checks every plan against them.
        targets = plan_refit(model=info.model, sources=sources, layout=spec.layout()).targets
        shapes = {t.hf_name: TensorSpec(shape=t.shape, dtype=t.dtype) for t in targets}
        # Reads are priced for the link they cross: UCX between CPU processes, cuda_ipc within a host.
        link = cost.CPU_UCX if self.device.type == "cpu" else cost.GPU_LOCAL
        self.rcv = Receiver(catalog=self.catalog, engine=BufferEngine(spec, shapes, self.device), name=NAME,
                            replica=self.replica, timeout_s=600, link_cost=link,
                            max_staging_bytes=self.max_staging_bytes, direct=self.direct,
                            direct_min_bytes=self.direct_min_bytes,
                            verify_digests=self.verify)  # fmt: skip
        self.engine_bytes = sum(t.numel() * t.element_size() for t in self.rcv.engine.tensors.values())

    def __call__(self, msg: dict[str, Any]) -> dict[str, Any]:
        if msg["cmd"] == "timeline":
            done = self.timeline.finish(msg.get("trace"), msg.get("plot")) if self.timeline is not None else {}
            return {"refits": done}
        if msg["cmd"] != "update":
            raise ValueError(msg["cmd"])
        # Traced from the second refit on: the first includes the set-up.
        if self.gpu_timeline and self.rcv is not None and self.timeline is None:
            from refit_bench.gpu_timeline import Timeline

            self.timeline = Timeline()
        if self.rcv is None:
            self._setup()
        self.rcv.verify_digests = bool(msg.get("verify", self.verify))
        self.rcv.cuda_ipc = bool(msg.get("cuda_ipc", True))
        self.rcv.mapped_install = bool(msg.get("mapped_install", True))
        checked = self.rcv.stats
        traced = self.timeline.mark(msg["version"]) if self.timeline is not None else contextlib.nullcontext()
        with traced:
            t0 = time.perf_counter()
            if msg.get("split"):
                staged = self.rcv.fetch(msg["version"])
                t1 = time.perf_counter()
                result = self.rcv.install(staged)  # the engine would pause only for this
            else:
                t1 = t0  # update_weights(): the engine pauses for all of it
                result = self.rcv.update_weights(msg["version"])
            t2 = time.perf_counter()
        plan = self.rcv.plan
        return {
            "version": result.version, "bytes": result.bytes, "wire_bytes": plan.wire_bytes,
            "staging_bytes": result.staging_bytes, "descriptors": result.num_descriptors, "sources": result.num_sources,
            "timings": result.timings, "fetch_s": t1 - t0, "stall_s": t2 - t1, "total_s": t2 - t0,
            "registrations": self.rcv.stats.registrations, "peak_staging_bytes": self.rcv.stats.peak_staging_bytes,
            "direct_bytes": result.direct_bytes, "chunks": result.chunks, "engine_bytes": self.engine_bytes,
            "bytes_by_rank": {str(r): n for r, n in plan.bytes_by_rank.items()},
            "fixed_s": sum(result.timings.get(k, 0.0) for k in ("plan", "prepare", "validate")),
            "verify_s": result.timings.get("verify", 0.0),  # wall time the checks added
            "verify_cpu_s": self.rcv.stats.verify_seconds - checked.verify_seconds,  # their own time
            "verified_bytes": self.rcv.stats.verified_bytes - checked.verified_bytes,
            "unverified_bytes": self.rcv.stats.unverified_bytes - checked.unverified_bytes,
            "ipc_copies": self.rcv.stats.ipc_copies - checked.ipc_copies,
            "mapped_chunks": self.rcv.stats.mapped_chunks - checked.mapped_chunks,
            "checked_copies": self.rcv.stats.checked_copies - checked.checked_copies,
        }  # fmt: skip


class ClassicRank:
    """The classic refit: trainer ranks send their shards to rank 0, which broadcasts the model."""

    def __init__(self, *, rank: int, world: int, port: int, trainers: int, shard_bytes: list[int], device: str):
        torch.set_num_threads(1)
        self.rank, self.trainers, self.shard_bytes = rank, trainers, shard_bytes
        self.device = measure.torch_device(device, rank % max(torch.cuda.device_count(), 1) if device == "cuda" else 0)
        join_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world, port=port)
        self.bcast_group = dist.new_group([0, *range(trainers, world)])
        total = sum(shard_bytes)
        mine = total if rank == 0 or rank >= trainers else shard_bytes[rank]
        self.buf = torch.ones(mine, dtype=torch.uint8, device=self.device)

    def __call__(self, msg: dict[str, Any]) -> dict[str, Any]:
        times = []
        for _ in range(msg["iters"] + 1):
            dist.barrier()
            t0 = time.perf_counter()
            if self.rank == 0:
                offset = self.shard_bytes[0]
                for src in range(1, self.trainers):
                    dist.recv(self.buf[offset : offset + self.shard_bytes[src]], src=src)
                    offset += self.shard_bytes[src]
            elif self.rank < self.trainers:
                dist.send(self.buf, dst=0)
            if self.rank == 0 or self.rank >= self.trainers:
                dist.broadcast(self.buf, src=0, group=self.bcast_group)
            measure.sync(self.device)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        return {"seconds": times[1:]}
