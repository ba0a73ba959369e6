"""Draw the refits of a trace kept by `refit-bench refit --gpu-timeline --json PATH` (PATH.trace<i>.json.gz):
a row per refit, the call on the host in grey, its GPU copies and kernels on top.

    python bench/scripts/gpu_timeline_plot.py bench/results/X.json.trace0.json.gz --out X.png [--last 4]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys

from refit_bench import gpu_timeline


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("trace", help="a Chrome trace, gzipped or not")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--last", type=int, default=4, help="how many of the last traced refits to draw")
    p.add_argument("--title", default="")
    args = p.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu_timeline.plot(events, args.out, title=args.title, last=args.last)
    print(gpu_timeline.describe([gpu_timeline.medians(list(gpu_timeline.summarize(events).values()))]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
