"""How much of the link a refit's batched NIXL READs keep, measured apart from the refit.

A source process on GPU 0 holds `--bytes`; this process, on GPU 1 (on GPU 0 too with `--same-gpu`,
or on a machine of one GPU: two processes sharing it), reads all of it: as one READ, as
`--batches` batches posted two in flight (`NixlAgent.read_batches`, as the streamed install posts its
direct reads), the same with each batch cut into `--pieces` descriptors, and the batches again while
this GPU copies 1 GiB buffers on another stream (an install's copies and digests beside the reads).
Medians of `--iters`, beside the same-run CUDA copy GPU 0 -> GPU 1.

    python bench/scripts/batched_read.py --bytes 15G --batches 9 --pieces 18 --iters 5 [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import threading

import torch

from refit.dtypes import device_of
from refit.transport.nixl import ReadJob, ReadOp
from refit_bench import measure, report
from refit_bench.transport import parse_size


def _batches(dst: torch.Tensor, info: dict, nbytes: int, batches: int, pieces: int) -> list[list[ReadJob]]:
    dev, dev_id = device_of(dst)
    step = -(-nbytes // (batches * pieces))
    ops = [ReadOp(local_addr=dst.data_ptr() + a, remote_addr=info["addr"] + a, nbytes=min(step, nbytes - a))
           for a in range(0, nbytes, step)]  # fmt: skip
    per = -(-len(ops) // batches)
    return [[ReadJob(agent_name=info["agent"], ops=ops[i : i + per], local_device=dev, local_device_id=dev_id,
                     remote_device=info["device"], remote_device_id=info["device_id"])]
            for i in range(0, len(ops), per)]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bytes", type=parse_size, default=parse_size("15G"))
    p.add_argument("--batches", type=int, default=9)
    p.add_argument("--pieces", type=int, default=18)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--same-gpu", action="store_true", help="read from a process on this process's GPU")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU")
    n = args.bytes
    local = torch.device("cuda:0" if args.same_gpu or torch.cuda.device_count() < 2 else "cuda:1")
    torch.cuda.set_device(local)
    rows = []
    with measure.read_from_source(n, local, prefix="probe-reader") as (agent, info, dst):

        def record(sample: measure.Sample) -> None:
            rows.append(sample.as_dict())
            print(sample.line(), flush=True)

        record(measure.copy_ceiling(n, local, iters=args.iters, source=torch.device("cuda:0")))
        whole = _batches(dst, info, n, 1, 1)
        record(measure.timed("one READ", n, lambda: agent.read(whole[0]), iters=args.iters))
        plain = _batches(dst, info, n, args.batches, 1)
        record(measure.timed(f"{len(plain)} batches, two in flight", n, lambda: agent.read_batches(plain),
                             iters=args.iters))  # fmt: skip
        from refit.transport import nixl

        for cap in (0.00005, 0.0):
            nixl._POLL_MAX_GPU_S = cap
            what = f"{len(plain)} batches, two in flight, polled every {cap * 1e6:.0f} us at most"
            record(measure.timed(what, n, lambda: agent.read_batches(plain), iters=args.iters))
        nixl._POLL_MAX_GPU_S = 0.0002
        for depth in (3, len(plain)):
            record(measure.timed(f"{len(plain)} batches, {depth} in flight", n,
                                 lambda d=depth: agent.read_batches(plain, depth=d), iters=args.iters))  # fmt: skip
        cut = _batches(dst, info, n, args.batches, args.pieces)
        what = f"{len(cut)} batches of {args.pieces} descriptors, two in flight"
        record(measure.timed(what, n, lambda: agent.read_batches(cut), iters=args.iters))
        if not torch.equal(dst[:4096], measure.filled(4096, local, seed=3)):
            raise RuntimeError("a READ delivered wrong bytes")
        small = min(3 << 29, n)  # QKV of Llama-3-8B at TP1 is ~1.6 GB in runs of 1 and 4 MiB (per query group)
        for size in (small, 4 << 20, 1 << 20):
            jobs = _batches(dst, info, small, 1, small // size)
            record(measure.timed(f"{small >> 20} MiB as {small // size} descriptors", small,
                                 lambda j=jobs: agent.read(j[0]), iters=args.iters))  # fmt: skip
        a = torch.ones(1 << 30, dtype=torch.uint8, device=local)
        b = torch.empty_like(a)
        stop = threading.Event()

        def busy() -> None:
            stream = torch.cuda.Stream(device=local)
            with torch.cuda.stream(stream):
                while not stop.is_set():
                    b.copy_(a)
                    stream.synchronize()

        worker = threading.Thread(target=busy, daemon=True)
        worker.start()
        try:
            what = f"{len(plain)} batches, beside 1 GiB copies on GPU 1"
            record(measure.timed(what, n, lambda: agent.read_batches(plain), iters=args.iters))
        finally:
            stop.set()
            worker.join()
    if args.json:
        report.write_json(args.json, {"machine": report.machine("cuda"), "bytes": n, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
