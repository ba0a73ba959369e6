"""Probe: how fast a staged chunk of fused QKV un-interleaves into an HF engine's q, k and v on one GPU.

At matched TP a Megatron trainer's `linear_qkv` holds, per query group, its q rows then its k and v
rows; an HF-layout engine (vLLM, transformers) keeps q, k and v apart. The receiver stages the fused
rows and copies each group's runs out. This times `--layers` layers of Llama-3-8B's QKV copied three
ways, each captured in a CUDA graph as the receiver replays it: one strided copy per q, k and v of a
layer (every group's runs as one view, as 8-byte words: what `refit.plan.assemble` builds), one
contiguous copy per run (24 a layer, one `torch._foreach_copy_`), and the same bytes copied
contiguously (the ceiling). GPU time by CUDA events, median of `--iters`. A measurement to report,
not a test. Usage:

    python bench/scripts/qkv_copies.py [--layers 16] [--iters 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from refit.graphs import capture
from refit_bench.measure import gpu_ms

HIDDEN, GROUPS, HEADS, HEAD_DIM = 4096, 8, 32, 128  # Llama-3-8B


def graphed(outs: list[torch.Tensor], ins: list[torch.Tensor]) -> Callable[[], None]:
    """The copies captured as a CUDA graph on a side stream (as `refit.copies` does), after a warm-up."""

    def copy() -> None:
        torch._foreach_copy_(outs, ins, non_blocking=True)

    copy()
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        graph = capture(copy)
    if graph is None:
        raise RuntimeError("the copies could not be captured as a CUDA graph")
    return graph.replay


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args()
    qpg = HEADS // GROUPS
    rows = (qpg + 2) * HEAD_DIM  # one group's rows in the fused tensor
    staged = [torch.randn(GROUPS * rows, HIDDEN, device="cuda").to(torch.bfloat16) for _ in range(args.layers)]
    engine = [
        {n: torch.empty(GROUPS * k * HEAD_DIM, HIDDEN, device="cuda", dtype=torch.bfloat16)
         for n, k in (("q", qpg), ("k", 1), ("v", 1))}
        for _ in range(args.layers)
    ]  # fmt: skip
    parts = (("q", 0, qpg), ("k", qpg, 1), ("v", qpg + 1, 1))  # (tensor, first head row of a group, heads)

    strided_outs, strided_ins, run_outs, run_ins = [], [], [], []
    for src, dst in zip(staged, engine, strict=True):
        grouped = src.view(GROUPS, qpg + 2, HEAD_DIM, HIDDEN)
        for name, at, heads in parts:
            out = dst[name].view(GROUPS, heads, HEAD_DIM, HIDDEN)
            strided_outs.append(out.view(torch.int64))
            strided_ins.append(grouped[:, at : at + heads].view(torch.int64))
            for g in range(GROUPS):
                run_outs.append(dst[name][g * heads * HEAD_DIM : (g + 1) * heads * HEAD_DIM])
                run_ins.append(src[g * rows + at * HEAD_DIM : g * rows + (at + heads) * HEAD_DIM])
    nbytes = sum(t.numel() * t.element_size() for t in staged)
    flat_in = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    flat_out = torch.empty_like(flat_in)

    def check(what: str) -> None:
        torch.cuda.synchronize()
        for src, dst in zip(staged, engine, strict=True):
            grouped = src.view(GROUPS, qpg + 2, HEAD_DIM, HIDDEN)
            for name, at, heads in parts:
                if not torch.equal(dst[name], grouped[:, at : at + heads].reshape(-1, HIDDEN)):
                    raise RuntimeError(f"{what}: wrong bytes in {name}")
                dst[name].zero_()

    results = {}
    for what, fn, writes in (
        ("strided, 3 copies a layer (refit today)", graphed(strided_outs, strided_ins), True),
        ("contiguous runs, 24 a layer", graphed(run_outs, run_ins), True),
        ("contiguous copy of the same bytes (ceiling)", lambda: flat_out.copy_(flat_in), False),
    ):
        ms = gpu_ms(fn, args.iters)
        results[what] = {"ms": ms, "gbps": nbytes / ms / 1e6}
        print(f"{what:48s} {ms:8.3f} ms {nbytes / ms / 1e6:9.1f} GB/s", flush=True)
        if writes:
            check(what)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": args.layers, "bytes": nbytes, "device": torch.cuda.get_device_name(), **results}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
