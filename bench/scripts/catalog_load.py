"""Load a real catalog as a large RL job does: trainer ranks publishing while a thousand readers refit.

A `refit-catalog serve` process on 127.0.0.1 (memory store, or Redis with `--store redis://...`). The
SourceRecords of `--ranks` trainer ranks of a real model layout (`refit_bench.trainer_sources`; default
Llama-3-70B at TP8 PP8: 64 ranks) are published concurrently, one client per rank, as version 1. Then
`--readers` concurrent readers, each with its own TCP connection (threads spread over `--procs`
processes), refit `--rounds` times each, as a receiver does: `resolve` the newest READY version (the full
records the first time, then with the known layout digest: tensors omitted) and the READY re-check
(`version_state`). Meanwhile the trainer ranks publish `--versions` more versions and retire the older
ones. Every call has a deadline and every loop a fixed length: a request is either answered or counted
lost (an error). Prints latency percentiles per call kind (p50, p99, max, in ms) and the counts; exits
non-zero if any request was lost or answered with an error. Usage:

    .venv/bin/python bench/scripts/catalog_load.py [--ranks 64] [--readers 1000] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from refit_bench.catalog_serve import drop_redis_keys, percentiles, serve

KINDS = ("publish", "resolve_full", "resolve_known", "state", "failed")


def _reader(address: str, name: str, rounds: int, timeout_s: float, start: threading.Barrier) -> dict[str, Any]:
    from refit.catalog.client import CatalogClient

    times: dict[str, list[float]] = {k: [] for k in KINDS}
    errors: Counter[str] = Counter()
    known, version = "", None
    with CatalogClient(address, timeout_s=timeout_s, dedicated_connection=True) as client:
        start.wait(timeout=600)
        for _ in range(rounds):  # a fixed number of refits: the loop is bounded whatever happens
            for kind in ("resolve", "state"):
                t0 = time.perf_counter()
                try:
                    if kind == "resolve":
                        resolved = client.resolve(name=name, known_layout=known)
                        kind = "resolve_known" if resolved.tensors_omitted else "resolve_full"
                        known, version = resolved.layout_digest, resolved.info.version
                    elif version is None:  # no resolve has answered yet: nothing to re-check
                        errors["state: no version resolved"] += 1
                        continue
                    else:
                        client.version_state(name=name, version=version)
                except Exception as exc:  # noqa: BLE001 - counted and reported, never retried
                    errors[f"{kind}: {type(exc).__name__}: {str(exc)[:600]}"] += 1
                    times["failed"].append(time.perf_counter() - t0)  # how long a failed call took
                    continue
                times[kind].append(time.perf_counter() - t0)
    return {"times": times, "errors": dict(errors)}


def reader_process(address: str, name: str, readers: int, rounds: int, timeout_s: float, go: Any, out: Any) -> None:
    """`readers` reader threads, released together once `go` is set; their figures go to `out`."""
    start = threading.Barrier(readers + 1)
    with ThreadPoolExecutor(max_workers=readers) as pool:
        futures = [pool.submit(_reader, address, name, rounds, timeout_s, start) for _ in range(readers)]
        go.wait(timeout=600)
        start.wait(timeout=600)
        results = [f.result() for f in futures]
    times = {k: [t for r in results for t in r["times"][k]] for k in KINDS}
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    out.put({"times": times, "errors": dict(errors)})


def _publish_all(clients: list[Any], name: str, version: int, meta: Any, sources: list[Any]) -> list[float]:
    def one(i: int) -> float:
        t0 = time.perf_counter()
        clients[i].publish(name=name, version=version, world_size=len(sources), model=meta, source=sources[i])
        return time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        return list(pool.map(one, range(len(sources))))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from refit.catalog.client import CatalogClient
    from refit_bench.trainer_sources import TrainerLayout, load_config, synthesize_sources

    layout = TrainerLayout(tp=args.tp, pp=args.pp, dp=args.dp)
    meta, sources = synthesize_sources(load_config(args.model), layout)
    if len(sources) != args.ranks:
        raise SystemExit(f"--ranks {args.ranks} but TP{args.tp} PP{args.pp} DP{args.dp} is {len(sources)} ranks")
    name = f"load-{uuid.uuid4().hex[:8]}"
    store = args.store if args.store == "memory" else f"{args.store}?prefix=bench-load-{name}"
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    per_proc = [args.readers // args.procs + (i < args.readers % args.procs) for i in range(args.procs)]
    serve_args = ["--max-workers", str(args.max_workers), "--resolve-cache-mb", str(args.resolve_cache_mb)]
    with serve(store, args=serve_args) as served:
        address = served.address
        procs = [
            ctx.Process(target=reader_process, args=(address, name, n, args.rounds, args.timeout_s, go, out))
            for n in per_proc
            if n
        ]
        for p in procs:
            p.start()
        clients = [CatalogClient(address, timeout_s=args.timeout_s, dedicated_connection=True) for _ in sources]
        try:
            publish = _publish_all(clients, name, 1, meta, sources)
            t0 = time.perf_counter()
            go.set()
            for version in range(2, args.versions + 2):  # trainer steps while the readers refit
                publish += _publish_all(clients, name, version, meta, sources)
                clients[0].retire(name=name, version=version - 1, and_older=True)
            results = [out.get(timeout=args.timeout_s * args.rounds * 2 + 600) for _ in procs]
            wall = time.perf_counter() - t0
            catalog_cpu_s = served.cpu_s()  # every publish and read, and the start-up
        finally:
            for c in clients:
                c.close()
            for p in procs:
                p.join(timeout=60)
        if args.store != "memory":
            drop_redis_keys(args.store, f"bench-load-{name}")
    times = {k: [t for r in results for t in r["times"][k]] for k in KINDS}
    times["publish"] = publish
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    expected_reads = args.readers * args.rounds * 2
    answered_reads = sum(len(times[k]) for k in ("resolve_full", "resolve_known", "state"))
    return {
        "store": args.store,
        "model": args.model,
        "trainer": layout.describe(),
        "ranks": len(sources),
        "tensors_per_rank": max(len(s.tensors) for s in sources),
        "readers": args.readers,
        "procs": args.procs,
        "rounds": args.rounds,
        "versions_published": args.versions + 1,
        "server_workers": args.max_workers,
        "resolve_cache_mb": args.resolve_cache_mb,
        "reads_expected": expected_reads,
        "reads_answered": answered_reads,
        "lost": expected_reads - answered_reads,
        "errors": dict(errors),
        "publishes": len(publish),
        "wall_s": round(wall, 2),
        "catalog_cpu_s": round(catalog_cpu_s, 2),
        "reads_per_s": round(answered_reads / wall, 1) if wall > 0 else 0.0,
        "latency": {k: percentiles(times[k]) for k in KINDS},
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs), load {os.getloadavg()[0]:.2f}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-70b", help="a refit_bench model config")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--pp", type=int, default=8)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=64, help="trainer ranks (must be tp * pp * dp)")
    parser.add_argument("--readers", type=int, default=1000, help="concurrent readers, each its own connection")
    parser.add_argument("--procs", type=int, default=4, help="processes the reader threads are spread over")
    parser.add_argument("--rounds", type=int, default=5, help="refits per reader")
    parser.add_argument("--versions", type=int, default=3, help="versions published while the readers run")
    parser.add_argument("--store", default="memory", help="'memory' or redis://host:port/db")
    parser.add_argument("--max-workers", type=int, default=16, help="the catalog's RPC threads")
    parser.add_argument(
        "--resolve-cache-mb", type=int, default=256, help="the catalog's Resolve reply cache (0: none, as before it)"
    )
    parser.add_argument("--timeout-s", type=float, default=120.0, help="deadline of every call")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['ranks']} trainer ranks ({result['trainer']}, {result['tensors_per_rank']} tensors/rank), "
            f"{result['readers']} readers x {result['rounds']} refits over {result['store']}"
        )
        print(
            f"reads: {result['reads_answered']}/{result['reads_expected']} answered, lost {result['lost']}, "
            f"errors {result['errors'] or 'none'}, {result['reads_per_s']} reads/s over {result['wall_s']} s, "
            f"catalog CPU {result['catalog_cpu_s']} s"
        )
        for kind, stats in result["latency"].items():
            print(f"  {kind:14s} {stats}")
    sys.exit(1 if result["lost"] or result["errors"] else 0)


if __name__ == "__main__":
    main()
