"""Time `CatalogClient.resolve` and `version_state` at the Llama-3-8B shape: a receiver's catalog round trips.

A real gRPC catalog on 127.0.0.1 in its own process, as deployed (`refit-catalog serve`; with
`--same-process`, embedded in the measuring process, which then shares its GIL with the server's
threads), over the memory store and over Redis unless `--redis ''`; the SourceRecords a
Megatron trainer of Llama-3-8B publishes at TP1 (1 rank) and TP8 (8 ranks), and for each the mean
per call of: `resolve` with the matching `known_layout` (tensors omitted: the cached-plan path),
`resolve` without it (the full records), and today's three calls (latest, get_sources, get_version).
`Ping` (an empty round trip) gives the scale: on a loaded machine every figure moves with it.

`--gaps-ms 0,10,100` times instead the cached-plan `resolve` (TP1, memory store) after each idle gap:
a receiver resolves once per refit, after seconds of generation, never back to back. gRPC's threads
on both sides have gone to sleep by then; waking them is part of every refit's fixed cost.

The READY re-check after every pull: `version_state` (GetState, the state alone) against
`get_version` (the whole VersionInfo) and `ping`, `--calls` each, interleaved in blocks so that a
change in the machine's load shifts all three alike; mean and median per call. `--state-only` skips
the resolve figures. A measurement to report, not a test. Usage:

    .venv/bin/python bench/scripts/catalog_resolve.py [--calls 200] [--redis redis://127.0.0.1:6379/15] [--state-only]
    .venv/bin/python bench/scripts/catalog_resolve.py --gaps-ms 0,10,100,500 [--calls 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator

from refit.catalog import wire
from refit.catalog.client import CatalogClient
from refit_bench.catalog_serve import drop_redis_keys, serve
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


def interleaved_us(fns: dict[str, Callable[[], object]], calls: int, *, block: int = 25) -> dict[str, object]:
    """`calls` timed calls of each of `fns`, run in blocks of `block` in turn: mean and median (us)."""
    for fn in fns.values():  # warm the channel, the server's threads and the store's connection
        for _ in range(min(10, calls)):
            fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    while any(len(t) < calls for t in times.values()):
        for key, fn in fns.items():
            for _ in range(min(block, calls - len(times[key]))):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    out: dict[str, object] = {}
    for key, t in times.items():
        out[f"{key}_us"] = round(statistics.fmean(t) * 1e6, 1)
        out[f"{key}_median_us"] = round(statistics.median(t) * 1e6, 1)
    return out


@contextlib.contextmanager
def catalog(store: str, *, same_process: bool) -> Iterator[str]:
    """The address of a catalog serving `store`, for the block's duration."""
    if same_process:
        with CatalogServer(store=store, port=0).start() as server:
            yield server.address
        return
    with serve(store, stop_s=10.0) as served:
        yield served.address


def measure(store: str, tp: int, calls: int, *, same_process: bool, state_only: bool) -> dict[str, object]:
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

        row: dict[str, object] = {
            "store": store.split("?")[0],
            "catalog": "same process" if same_process else "own process",
            "tp": tp,
            "ranks": len(sources),
            "calls": calls,
            "load_1min": round(os.getloadavg()[0], 2),  # the machine's load as the figures were taken
        }
        # The READY re-check: the state alone, the whole VersionInfo, and the bare round trip for scale.
        row |= interleaved_us(
            {
                "ping": client.ping,
                "version_state": lambda: client.version_state(name=name, version=1),
                "get_version": lambda: client.get_version(name=name, version=1),
            },
            calls,
        )
        if state_only:
            return row
        return row | {
            "tensors_per_rank": len(sources[0].tensors),
            "response_bytes_omitted": wire.resolved_to_proto(small).ByteSize(),
            "response_bytes_full": wire.resolved_to_proto(full).ByteSize(),
            "resolve_known_layout_us": mean_us(lambda: client.resolve(name=name, known_layout=known), calls),
            "resolve_given_version_known_layout_us": mean_us(
                lambda: client.resolve(name=name, version=1, known_layout=known), calls
            ),
            "resolve_full_us": mean_us(lambda: client.resolve(name=name), max(calls // 4, 1)),
            "latest_get_sources_get_version_us": mean_us(three_calls, max(calls // 4, 1)),
        }


def after_gaps(gaps_ms: list[float], calls: int, *, same_process: bool) -> dict[str, object]:
    """Median and min (us) of the cached-plan `resolve`, each call after an idle gap of each length."""
    meta, sources = synthesize_sources(LLAMA_3_8B, TrainerLayout(tp=1))
    row: dict[str, object] = {"catalog": "same process" if same_process else "own process", "calls": calls,
                              "load_1min": round(os.getloadavg()[0], 2)}  # fmt: skip
    with catalog("memory", same_process=same_process) as address, CatalogClient(address) as client:
        for s in sources:
            client.publish(name="gaps", version=1, world_size=1, model=meta, source=s)
        known = client.resolve(name="gaps").layout_digest
        for gap in gaps_ms:
            times = []
            for _ in range(calls):
                time.sleep(gap / 1e3)
                t0 = time.perf_counter()
                client.resolve(name="gaps", version=1, known_layout=known, ranks=(0,))
                times.append(time.perf_counter() - t0)
            row[f"gap_{gap:g}ms_median_us"] = round(statistics.median(times) * 1e6, 1)
            row[f"gap_{gap:g}ms_min_us"] = round(min(times) * 1e6, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="'' to skip the Redis store")
    parser.add_argument("--same-process", action="store_true", help="embed the catalog in this process")
    parser.add_argument("--state-only", action="store_true", help="only ping, version_state and get_version")
    parser.add_argument("--gaps-ms", default="", help="comma-separated idle gaps before each resolve, e.g. 0,10,100")
    args = parser.parse_args()
    if args.gaps_ms:
        gaps = [float(g) for g in args.gaps_ms.split(",")]
        print(json.dumps(after_gaps(gaps, args.calls, same_process=args.same_process)), flush=True)
        return
    stores = ["memory"] + ([f"{args.redis}?prefix=bench-resolve-{uuid.uuid4().hex[:8]}"] if args.redis else [])
    rows = []
    for store in stores:
        for tp in (1,) if args.state_only else (1, 8):
            rows.append(measure(store, tp, args.calls, same_process=args.same_process, state_only=args.state_only))
            print(json.dumps(rows[-1]), flush=True)
    if args.redis:  # drop the benchmark's keys
        drop_redis_keys(args.redis, stores[-1].split("prefix=")[1])


if __name__ == "__main__":
    main()
