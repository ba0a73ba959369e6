"""Time `CatalogClient.resolve` at the Llama-3-8B shape: the receiver's catalog round trip per refit.

A real gRPC catalog on 127.0.0.1 in its own process, as deployed (`refit-catalog serve`; with
`--same-process`, embedded in the measuring process, which then shares its GIL with the server's
threads), over the memory store and over Redis unless `--redis ''`; the SourceRecords a
Megatron trainer of Llama-3-8B publishes at TP1 (1 rank) and TP8 (8 ranks), and for each the mean
per call of: `resolve` with the matching `known_layout` (tensors omitted: the cached-plan path),
`resolve` without it (the full records), and today's three calls (latest, get_sources, get_version).
`Ping` (an empty round trip) gives the scale: on a loaded machine every figure moves with it.
A measurement to report, not a test. Usage:

    .venv/bin/python bench/scripts/catalog_resolve.py [--calls 200] [--redis redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from refit.catalog import wire
from refit.catalog.client import CatalogClient
from refit_bench.trainer_sources import TrainerLayout, synthesize_sources
from refit_server import CatalogServer

# meta-llama/Meta-Llama-3-8B config.json (public), in the form refit_bench.trainer_sources reads.
LLAMA_3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def mean_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(min(10, calls)):  # warm the channel and the server's threads
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.fmean(times) * 1e6


@contextlib.contextmanager
def catalog(store: str, *, same_process: bool) -> Iterator[str]:
    """The address of a catalog serving `store`, for the block's duration."""
    if same_process:
        with CatalogServer(store=store, port=0).start() as server:
            yield server.address
        return
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "server"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "refit_server.cli", "serve", "--port", "0", "--store", store, "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "refit catalog serving on HOST:PORT"; blocks until it binds
        if not line:
            raise RuntimeError(f"refit-catalog exited with {proc.wait(timeout=10)} before serving")
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def measure(store: str, tp: int, calls: int, *, same_process: bool) -> dict[str, object]:
    meta, sources = synthesize_sources(LLAMA_3_8B, TrainerLayout(tp=tp))
    name = f"llama-3-8b-tp{tp}"  # one Redis prefix serves both layouts
    with catalog(store, same_process=same_process) as address, CatalogClient(address) as client:
        for s in sources:
            client.publish(name=name, version=1, world_size=len(sources), model=meta, source=s)
        full = client.resolve(name=name)
        known = full.layout_digest
        small = client.resolve(name=name, known_layout=known)
        assert small.tensors_omitted and not full.tensors_omitted

        def three_calls() -> None:
            info = client.latest(name=name)
            assert info is not None
            client.get_sources(name=name, version=info.version)
            client.get_version(name=name, version=info.version)

        return {
            "store": store.split("?")[0],
            "catalog": "same process" if same_process else "own process",
            "tp": tp,
            "ranks": len(sources),
            "tensors_per_rank": len(sources[0].tensors),
            "response_bytes_omitted": wire.resolved_to_proto(small).ByteSize(),
            "response_bytes_full": wire.resolved_to_proto(full).ByteSize(),
            "ping_us": mean_us(client.ping, calls),  # the bare gRPC round trip, for scale
            "resolve_known_layout_us": mean_us(lambda: client.resolve(name=name, known_layout=known), calls),
            "resolve_given_version_known_layout_us": mean_us(
                lambda: client.resolve(name=name, version=1, known_layout=known), calls
            ),
            "resolve_full_us": mean_us(lambda: client.resolve(name=name), max(calls // 4, 1)),
            "latest_get_sources_get_version_us": mean_us(three_calls, max(calls // 4, 1)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="'' to skip the Redis store")
    parser.add_argument("--same-process", action="store_true", help="embed the catalog in this process")
    args = parser.parse_args()
    stores = ["memory"] + ([f"{args.redis}?prefix=bench-resolve-{uuid.uuid4().hex[:8]}"] if args.redis else [])
    rows = []
    for store in stores:
        for tp in (1, 8):
            rows.append(measure(store, tp, args.calls, same_process=args.same_process))
            print(json.dumps(rows[-1]), flush=True)
    if args.redis:  # drop the benchmark's keys
        import redis

        prefix = stores[-1].split("prefix=")[1]
        with redis.Redis.from_url(args.redis) as raw:
            keys = list(raw.scan_iter(match=f"{prefix}:*"))
            if keys:
                raw.delete(*keys)


if __name__ == "__main__":
    main()
