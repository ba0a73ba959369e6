"""What a copy out of another process's GPU memory costs over CUDA IPC, against the same copy in one process.

A child process allocates `--gib` GiB on GPU 0 and exports its CUDA IPC handle (`refit.compat.cuda`);
this process maps it and times, with CUDA events, copying all of it into its own buffer as one
`cudaMemcpyAsync` and as `--pieces` of them (on one stream, then round-robin over K streams), against
torch's device-to-device copy of a local buffer and the same pieces out of it. Medians of `--iters`;
JSON with `--json`.

    python bench/scripts/ipc_copy.py --gib 8 --pieces 99 --streams 2 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

CHILD = """
import sys, torch
from refit.compat import cuda
buf = torch.ones({n}, dtype=torch.uint8, device="cuda:0")
torch.cuda.synchronize()
handle, offset = cuda.export(buf.data_ptr(), 0)
print(handle.hex(), offset, flush=True)
sys.stdin.readline()
"""


def _time(fn: Callable[[], None], iters: int) -> tuple[float, float]:
    """Medians of (GPU seconds between events around `fn`, host seconds of `fn` until the GPU is done)."""
    gpu, host = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        fn()
        end.record()
        end.synchronize()
        host.append(time.perf_counter() - t0)
        gpu.append(start.elapsed_time(end) / 1e3)
    return statistics.median(gpu), statistics.median(host)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=8.0)
    p.add_argument("--pieces", type=int, default=99)
    p.add_argument("--iters", type=int, default=9)
    p.add_argument("--streams", type=int, nargs="*", default=[2, 4], help="the pieces round-robin over K streams")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from refit.compat import cuda

    n = int(args.gib * (1 << 30))
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(n=n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    out: dict = {"bytes": n, "pieces": args.pieces}
    try:
        handle_hex, offset = child.stdout.readline().split()
        base, _ = cuda.open_handle(bytes.fromhex(handle_hex), 0)
        remote = base + int(offset)
        dst = torch.empty(n, dtype=torch.uint8, device="cuda:0")
        local = torch.empty(n, dtype=torch.uint8, device="cuda:0")
        piece = n // args.pieces
        extra = [torch.cuda.Stream() for _ in range(max(args.streams, default=1))]

        def pieces(src: int, streams: int) -> Callable[[], None]:
            def fn() -> None:
                main = torch.cuda.current_stream()
                use = extra[:streams] if streams > 1 else [main]
                for s in use:
                    s.wait_stream(main)
                for i in range(args.pieces):
                    size = n - i * piece if i == args.pieces - 1 else piece
                    cuda.copy(dst.data_ptr() + i * piece, src + i * piece, size, use[i % len(use)].cuda_stream)
                for s in use:
                    main.wait_stream(s)

            return fn

        def one() -> None:
            cuda.copy(dst.data_ptr(), remote, n, torch.cuda.current_stream().cuda_stream)

        cases = {"local_torch": lambda: dst.copy_(local), "ipc_one": one,
                 "local_pieces": pieces(local.data_ptr(), 1), "ipc_pieces": pieces(remote, 1)}  # fmt: skip
        cases.update({f"ipc_pieces_{k}streams": pieces(remote, k) for k in args.streams})
        for what, fn in cases.items():
            fn()
            gpu_s, host_s = _time(fn, args.iters)
            out[what] = {"gpu_s": gpu_s, "host_s": host_s, "gbps": n / gpu_s / 1e9}
            print(
                f"{what:22s} {1e3 * gpu_s:7.3f} ms on the GPU ({n / gpu_s / 1e9:7.1f} GB/s), {1e3 * host_s:.3f} ms host"
            )
        cuda.close_handle(base, 0)
    finally:
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
