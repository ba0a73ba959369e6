"""Micro-benchmark: copying bytes and digesting them where they landed, as two passes and as one kernel.

A receiver that checks its direct reads copies each one (`cudaMemcpyAsync`) and then reads every byte
again for its digest (cell sums of int64 words, `refit.plan.digest_batch`). `refit.kernels.copy_sum`
(`CopySum`) does both in one pass: it loads each tile once, stores it and sums its cells. This times, on one GPU,
`--gib` GiB in `--pieces` contiguous runs with cells of `--cell` bytes (CUDA events, medians of
`--iters`): torch's copy alone, copy then cell sums, and the fused kernel (checked bit-equal).

    python bench/scripts/copy_sum.py --gib 8 --pieces 291 --cell 16384 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

from refit.kernels import copy_sum


def _time(fn: Callable[[], None], iters: int) -> float:
    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--pieces", type=int, default=291)
    ap.add_argument("--cell", type=int, nargs="+", default=[16384, 1024])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tile", type=int, nargs="+", default=[copy_sum.TILE_WORDS], help="int64 words per program")
    ap.add_argument("--warps", type=int, nargs="+", default=[copy_sum.WARPS])
    ap.add_argument("--json")
    args = ap.parse_args()
    n = int(args.gib * 2**30) // (args.pieces * 16384) * args.pieces * 16384
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    piece = n // args.pieces
    rows = []
    copy_s = _time(lambda: dst.copy_(src), args.iters)
    pieces_s = _time(lambda: [dst[i : i + piece].copy_(src[i : i + piece]) for i in range(0, n, piece)], args.iters)
    for cell in args.cell:
        sums = torch.empty(n // cell, dtype=torch.int64, device="cuda")
        words = dst.view(torch.int64).view(-1, cell // 8)

        def two_pass(cell: int = cell, sums: torch.Tensor = sums, words: torch.Tensor = words) -> None:
            for i in range(0, n, piece):
                dst[i : i + piece].copy_(src[i : i + piece])
            torch.sum(words, -1, out=sums)

        two_s = _time(two_pass, args.iters)
        want = sums.clone()
        print(f"cell {cell} B: one copy {copy_s * 1e3:.2f} ms ({n / copy_s / 1e9:.0f} GB/s), {args.pieces} copies "
              f"{pieces_s * 1e3:.2f} ms, the copies and then the sums {two_s * 1e3:.2f} ms")  # fmt: skip
        for tile in args.tile:
            for warps in args.warps:
                copy_sum.TILE_WORDS, copy_sum.WARPS = tile, warps
                runs = [copy_sum.Run(src[i : i + piece], dst[i : i + piece], i // cell) for i in range(0, n, piece)]
                fused = copy_sum.CopySum(runs, cell=cell)
                sums.zero_()
                dst.zero_()
                fused_s = _time(lambda fused=fused, sums=sums: fused.run(sums), args.iters)
                ok = bool(torch.equal(dst, src)) and bool(torch.equal(sums, want))
                rows.append({"cell": cell, "tile_words": tile, "warps": warps, "two_pass_s": two_s, "fused_s": fused_s,
                             "exact": ok})  # fmt: skip
                print(f"  tile {tile} words, {warps} warps: fused {fused_s * 1e3:.2f} ms "
                      f"({n / fused_s / 1e9:.0f} GB/s), exact={ok}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"bytes": n, "pieces": args.pieces, "copy_s": copy_s, "pieces_s": pieces_s, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
