"""The link bound of a trainer TP2 -> engine TP1 refit on two GPUs, measured rather than assumed.

The engine's GPU (1) pulls one half of the bytes from a process on GPU 0 (over NVLink) and the other
half from a process on its own GPU. Times, same run, medians: each half alone and both at once, as
NIXL READs (what refit posts) and as CUDA IPC copies on two streams (what the hardware allows).

    python bench/scripts/two_sources.py --bytes 8G --iters 5 [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import sys

import torch

from refit.dtypes import device_of
from refit.transport.nixl import NixlAgent, ReadJob, ReadOp
from refit_bench import measure, report
from refit_bench.procs import Worker
from refit_bench.transport import parse_size


def _job(dst: torch.Tensor, info: dict, nbytes: int) -> ReadJob:
    dev, dev_id = device_of(dst)
    op = ReadOp(local_addr=dst.data_ptr(), remote_addr=info["addr"], nbytes=nbytes)
    return ReadJob(agent_name=info["agent"], ops=[op], local_device=dev, local_device_id=dev_id,
                   remote_device=info["device"], remote_device_id=info["device_id"])  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bytes", type=parse_size, default=parse_size("8G"))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    n = args.bytes
    local = torch.device("cuda:1")
    torch.cuda.set_device(local)
    far = Worker("refit_bench.measure:Source", device="cuda", device_index=0)
    near = Worker("refit_bench.measure:Source", device="cuda", device_index=1)
    agent = NixlAgent(prefix="probe-reader")
    rows = []
    try:
        far.wait_started()
        near.wait_started()
        infos = [w.call(cmd="alloc", nbytes=n, seed=s) for w, s in ((far, 3), (near, 5))]
        handles = [w.call(cmd="ipc")["handle"] for w in (far, near)]
        dsts = [torch.empty(n, dtype=torch.uint8, device=local) for _ in range(2)]
        for d in dsts:
            dev, dev_id = device_of(d)
            agent.register(d.data_ptr(), n, device=dev, device_id=dev_id)
        for info in infos:
            agent.connect(info["agent"], base64.b64decode(info["metadata"]))
        jobs = [_job(d, info, n) for d, info in zip(dsts, infos, strict=True)]

        def record(sample: measure.Sample) -> None:
            rows.append(sample.as_dict())
            print(sample.line(), flush=True)

        record(measure.timed("NIXL READ GPU0 -> GPU1 (one half)", n, lambda: agent.read([jobs[0]]), iters=args.iters))
        record(measure.timed("NIXL READ GPU1 -> GPU1 (other half)", n, lambda: agent.read([jobs[1]]), iters=args.iters))
        record(measure.timed("NIXL READ both halves at once", 2 * n, lambda: agent.read(jobs), iters=args.iters))
        for d, s in zip(dsts, (3, 5), strict=True):
            if not torch.equal(d[:4096], measure.filled(4096, local, seed=s)):
                raise RuntimeError("a READ delivered wrong bytes")
        srcs = [measure._open_cuda(h) for h in handles]
        streams = [torch.cuda.Stream(device=local) for _ in range(2)]

        def copies(which: tuple[int, ...]) -> None:
            for i in which:
                with torch.cuda.stream(streams[i]):
                    dsts[i].copy_(srcs[i])
            torch.cuda.synchronize(local)
            torch.cuda.synchronize(torch.device("cuda:0"))

        record(measure.timed("IPC copy GPU0 -> GPU1", n, lambda: copies((0,)), iters=args.iters))
        record(measure.timed("IPC copy GPU1 -> GPU1", n, lambda: copies((1,)), iters=args.iters))
        record(measure.timed("IPC copies of both halves, two streams", 2 * n, lambda: copies((0, 1)), iters=args.iters))
    finally:
        agent.close()
        far.close()
        near.close()
    if args.json:
        report.write_json(args.json, {"machine": report.machine("cuda"), "bytes_per_half": n, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
