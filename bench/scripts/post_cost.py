"""What posting a GPU-to-GPU NIXL READ costs the thread that posts it, by descriptor count and size.

A source process on GPU 0 holds `--bytes`; this process (on GPU 0 too, or GPU 1 with `--other-gpu`)
reads `--bytes` as one transfer of D descriptors for each D of `--descs`, and times NIXL's
`initialize_xfer`, `transfer` (the post) and the wait for DONE apart. Medians of `--iters`.

    python bench/scripts/post_cost.py --bytes 1G --descs 1,8,64,256 --iters 5 [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from refit.dtypes import device_of
from refit_bench import measure, report
from refit_bench.transport import parse_size


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bytes", type=parse_size, default=parse_size("1G"))
    p.add_argument("--descs", default="1,8,64,256")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--other-gpu", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    n = args.bytes
    local = torch.device("cuda:1" if args.other_gpu else "cuda:0")
    torch.cuda.set_device(local)
    rows = []
    with measure.read_from_source(n, local, prefix="probe-post") as (agent, info, dst):
        dev_id = device_of(dst)[1]
        raw = agent._agent  # NIXL's own agent: each of its calls is timed apart
        for d in [int(x) for x in args.descs.split(",")]:
            step = n // d
            offs = np.arange(d, dtype=np.uint64) * np.uint64(step)
            sizes = np.full(d, step, np.uint64)
            loc = np.stack([np.uint64(dst.data_ptr()) + offs, sizes, np.full(d, dev_id, np.uint64)], axis=1)
            rem = np.stack([np.uint64(info["addr"]) + offs, sizes, np.full(d, info["device_id"], np.uint64)], axis=1)
            ld, rd = raw.get_xfer_descs(loc, "VRAM"), raw.get_xfer_descs(rem, "VRAM")
            init, post, wait = [], [], []
            for _ in range(args.iters + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                h = raw.initialize_xfer("READ", ld, rd, info["agent"])
                t1 = time.perf_counter()
                raw.transfer(h)
                t2 = time.perf_counter()
                while raw.check_xfer_state(h) != "DONE":
                    if time.perf_counter() - t2 > 60:
                        raise TimeoutError(f"a READ of {n} bytes did not land in 60 s")
                t3 = time.perf_counter()
                raw.release_xfer_handle(h)
                init.append(t1 - t0)
                post.append(t2 - t1)
                wait.append(t3 - t2)
            row = {
                "descriptors": d,
                "bytes_each": step,
                "init_ms": 1e3 * statistics.median(init[1:]),
                "post_ms": 1e3 * statistics.median(post[1:]),
                "post_us_per_desc": 1e6 * statistics.median(post[1:]) / d,
                "done_ms": 1e3 * statistics.median(wait[1:]),
                "first_post_ms": 1e3 * post[0],
            }
            rows.append(row)
            print(row, flush=True)
    if args.json:
        report.write_json(args.json, {"machine": report.machine("cuda"), "bytes": n, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
