"""Probe: how fast a staged chunk of row-parallel halves copies into engine tensors on one GPU.

A trainer TP2 -> engine TP1 refit of Llama-3-8B stages each layer's row-parallel weights (`o_proj`,
`down_proj`) as two halves, one per trainer rank, each packed in the slot; the install writes every
half into its columns of the engine tensor: a strided copy (rows of `in/2` elements, `in` apart).
This times a chunk of such halves (`--layers` layers, ~240 MiB each) as the receiver copies them
(`torch._foreach_copy_` of the halves, as bf16 and as 8-byte words) and alternatives: one copy per
tensor through a [rows, 2, half] view, and the same bytes copied contiguously (the ceiling). GPU
time by CUDA events, median of `--iters`. A measurement to report, not a test. Usage:

    python bench/scripts/chunk_copies.py [--layers 2] [--iters 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from refit_bench.measure import gpu_ms

HIDDEN, FFN = 4096, 14336  # Llama-3-8B


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, FFN)] * args.layers  # o_proj, down_proj: [out, in], split on in
    dests = [torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in shapes]
    nbytes = sum(d.numel() * 2 for d in dests)
    slot = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    outs, ins, packed, at = [], [], [], 0
    for d in dests:
        rows, cols = d.shape
        half = cols // 2
        for r in range(2):  # rank r's half, packed [rows, half] in the slot
            src = slot[at : at + rows * half].view(rows, half)
            outs.append(d[:, r * half : (r + 1) * half])
            ins.append(src)
            at += rows * half
        packed.append((d.view(rows, 2, half), slot[at - 2 * rows * half : at].view(2, rows, half).transpose(0, 1)))
    words_out = [o.view(torch.int64) for o in outs]
    words_in = [i.view(torch.int64) for i in ins]
    flat = torch.empty_like(slot)
    ways = {
        "halves, bf16 (foreach_copy_)": lambda: torch._foreach_copy_(outs, ins, non_blocking=True),
        "halves, 8-byte words (foreach_copy_, refit today)": lambda: torch._foreach_copy_(
            words_out, words_in, non_blocking=True
        ),
        "one copy per tensor, [rows, 2, half] view": lambda: [o.copy_(i, non_blocking=True) for o, i in packed],
        "same bytes, contiguous (ceiling)": lambda: flat.copy_(slot, non_blocking=True),
    }
    rows = []
    for what, fn in ways.items():
        ms = gpu_ms(fn, args.iters)
        rows.append({"what": what, "bytes": nbytes, "ms": round(ms, 3), "gbps": round(nbytes / ms / 1e6, 1)})
        print(f"{what:55s} {ms:7.3f} ms  {nbytes / ms / 1e6:7.1f} GB/s", flush=True)
    for o, d in zip(outs, (x for x in dests for _ in range(2)), strict=True):
        assert o.data_ptr() >= d.data_ptr()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
