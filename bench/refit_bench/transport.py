"""`refit-bench transport`: bulk transfer between two processes over sizes, beside its ceiling and baselines.

For each size, in one run: the copy ceiling (memcpy on CPU, device-to-device copy on GPU), NIXL
READ through refit's transport defaults (one descriptor, and optionally split into many), the
`torch.distributed` broadcast a user would otherwise pick (gloo on CPU; NCCL where two GPUs exist),
and on GPU a CUDA IPC handle + copy.

    refit-bench transport --sizes 64M,256M,1G [--device cuda] [--descriptors 400] [--json] [--plot t.png]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from refit.dtypes import device_of
from refit.transport.nixl import NixlAgent
from refit_bench import measure, report
from refit_bench.procs import Worker, join_group, rendezvous


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("transport", help="bulk transfer between two processes, with ceiling and baselines")
    p.add_argument("--sizes", default="64M,256M,1G", help="comma-separated sizes (K/M/G suffixes)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--iters", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    p.add_argument("--descriptors", type=int, default=0, help="also READ each size split into this many pieces")
    p.add_argument("--no-baselines", action="store_true", help="skip the broadcast and CUDA IPC baselines")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON ('-': stdout)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write GB/s against size as a PNG")
    return p


def run(args: argparse.Namespace) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    result = measure_transport(
        sizes=sizes, device=args.device, iters=args.iters, descriptors=args.descriptors,
        baselines=not args.no_baselines, progress=args.json != "-",
    )  # fmt: skip
    if args.json:
        report.write_json(args.json, result)
    if args.json != "-":
        print(report.machine_line(result["machine"]))
        rows = [
            [report.size(r["bytes"]), r["what"], f"{r['gbps']:.2f}", f"{r['best_gbps']:.2f}", f"{r['vs_ceiling']:.2f}"]
            for r in result["rows"]
        ]
        print(report.table(["size", "path", "GB/s", "best GB/s", "x ceiling"], rows))
    if args.plot:
        report.plot_transport(result, args.plot)
    return 0


def measure_transport(
    *, sizes: list[int], device: str, iters: int, descriptors: int = 0, baselines: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Measure every path at every size; rows carry GB/s and the ratio to that size's ceiling."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    # Two GPUs: the source on the second, so NIXL and NCCL cross NVLink; one GPU: both on it.
    src_index = 1 if gpus >= 2 else 0
    backend = "nccl" if gpus >= 2 else "gloo"
    world = 2 if baselines else 0
    store = rendezvous() if world else None
    source = Worker(
        "refit_bench.measure:Source", device=device, device_index=src_index, world=world,
        port=store.port if store else 0, backend=backend,
    )  # fmt: skip
    local = measure.torch_device(device, 0)
    if device == "cuda":
        torch.cuda.set_device(local)
    agent = NixlAgent(prefix="bench-reader")
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(sizes), desc="transport", unit="size", disable=not progress)
    try:
        if store is not None:
            join_group(backend, rank=1, world_size=world, store=store)
        source.wait_started()
        # One buffer per side, registered once, read by prefix: what refit itself does across refits.
        largest = max(sizes)
        info = source.call(cmd="alloc", nbytes=largest, seed=3)
        dst = torch.empty(largest, dtype=torch.uint8, device=local)
        dst_device, dst_device_id = device_of(dst)
        agent.register(dst.data_ptr(), largest, device=dst_device, device_id=dst_device_id)
        handle = source.call(cmd="ipc")["handle"] if baselines and device == "cuda" else None
        for nbytes in sizes:
            # Two GPUs: the transfers cross devices, so the ceiling is the cross-device copy.
            peer = measure.torch_device(device, src_index) if gpus >= 2 else None
            ceiling = measure.copy_ceiling(nbytes, local, iters=iters, source=peer)
            samples = [ceiling]
            if peer is not None:
                samples.append(measure.copy_ceiling(nbytes, local, iters=iters))
            dst.zero_()
            samples.append(measure.nixl_read(agent, dst, info, nbytes, iters=iters))
            if not torch.equal(dst[:nbytes], measure.filled(nbytes, local, seed=3)):
                raise RuntimeError(f"NIXL READ of {nbytes} bytes delivered wrong bytes")
            if descriptors > 1:
                samples.append(measure.nixl_read(agent, dst, info, nbytes, descriptors=descriptors, iters=iters))
            if world:
                source.send(cmd="bcast", nbytes=nbytes, iters=iters)
                samples.append(measure.broadcast(dst, nbytes, iters=iters, backend=backend))
                source.recv()
            if handle is not None:
                samples.append(measure.ipc_copy(dst, handle, nbytes, iters=iters))
            rows.extend({**s.as_dict(), "vs_ceiling": round(s.gbps / ceiling.gbps, 3)} for s in samples)
            bar.update()
    finally:
        bar.close()
        agent.close()
        source.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return {"mode": "transport", "machine": report.machine(device), "device": device, "rows": rows,
            "env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")}}  # fmt: skip
