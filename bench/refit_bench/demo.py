"""`make demo`: a real refit of a ~100M-parameter Llama-shaped model, end to end.

Two Megatron-Core trainer ranks (TP 2, separate processes, gloo) publish their native shards to an
embedded catalog; this process plans sliced NIXL pulls, un-interleaves QKV, splits gate/up and
installs the weights into a Hugging Face LlamaForCausalLM. Two versions are refitted: the first
includes connection set-up, the second is the steady state.

    python -m refit_bench.demo [--shape llama-100m] [--tp 2] [--pp 1] [--versions 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import warnings
from typing import Any

import torch

from refit_bench.procs import rendezvous
from refit_bench.synthetic import SHAPES, build_gpt, hf_engine_model, init_trainer_rank

NAME = "demo"


def _trainer(rank: int, world: int, port: int, args: dict[str, Any], cue: Any, done: Any, out: Any) -> None:
    try:
        torch.set_num_threads(1)
        # megatron-core warns at import that Apex / Transformer Engine are absent: expected on CPU.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
        init_trainer_rank(rank, world, port, tp=args["tp"], pp=args["pp"])
        from refit import Publisher

        torch.manual_seed(1234 + rank)
        model = build_gpt(SHAPES[args["shape"]])
        with Publisher(catalog=args["catalog"], model=model, name=NAME) as pub:
            for version in range(1, args["versions"] + 1):
                if version > 1:
                    cue.wait(timeout=300)
                    pub.invalidate()  # before the weights change: readers of the old version discard it
                    with torch.no_grad():
                        for p in model.parameters():
                            p.mul_(0.5)  # stands in for an optimizer step: every tensor changes
                info = pub.stream_weights(version)
                out.put(("published", rank, version, info.state.value))
            done.wait(timeout=600)
    except BaseException as exc:  # report, then let the parent fail loudly
        out.put(("error", rank, repr(exc), ""))
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-100m", choices=sorted(SHAPES))
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--versions", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    from refit import CatalogServer, Receiver
    from refit.engines import HFEngine

    shape = SHAPES[args.shape]
    world = args.tp * args.pp
    say = (lambda *a: None) if args.json else print
    with CatalogServer(store="memory", port=0).start() as server:
        say(f"catalog    {server.address} (embedded, in-memory store)")
        say(f"model      {shape.name}: {shape.num_params / 1e6:.0f}M parameters, bf16")
        say(f"trainer    {world} Megatron-Core rank(s): TP {args.tp} x PP {args.pp} (gloo, one process each)")
        ctx = mp.get_context("spawn")
        cue, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
        cfg = {"shape": shape.name, "tp": args.tp, "pp": args.pp, "versions": args.versions, "catalog": server.address}
        store = rendezvous()  # held until the trainers are gone
        procs = [ctx.Process(target=_trainer, args=(r, world, store.port, cfg, cue, done, out)) for r in range(world)]
        for p in procs:
            p.start()
        rows = []
        try:
            engine_model = hf_engine_model(shape)
            say(f"engine     HF LlamaForCausalLM, TP 1, {sum(p.numel() for p in engine_model.parameters()) / 1e6:.0f}M")
            with Receiver(catalog=server.address, engine=HFEngine(engine_model), name=NAME) as rcv:
                for version in range(1, args.versions + 1):
                    if version > 1:
                        cue.set()
                    _wait_published(out, world, version)
                    result = rcv.update_weights(version=version)
                    rows.append(result)
        finally:
            done.set()
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.terminate()
    report = [
        {
            "version": r.version,
            "bytes": r.bytes,
            "seconds": round(r.seconds, 4),
            "wire_seconds": round(r.wire_seconds, 4),
            "gbps_wire": round(r.gbps, 3),
            "gbps_end_to_end": round(r.bytes / r.seconds / 1e9, 3),
            "tensors": r.num_tensors,
            "sources": r.num_sources,
            "descriptors": r.num_descriptors,
        }
        for r in rows
    ]
    if args.json:
        print(json.dumps({"shape": shape.name, "tp": args.tp, "pp": args.pp, "refits": report}))
        return 0
    print()
    print(f"{'version':>7} {'bytes':>13} {'seconds':>8} {'wire s':>8} {'GB/s wire':>9} {'GB/s total':>10} {'reads':>5}")
    for r in report:
        print(
            f"{r['version']:>7} {r['bytes']:>13,} {r['seconds']:>8.3f} {r['wire_seconds']:>8.3f} "
            f"{r['gbps_wire']:>9.2f} {r['gbps_end_to_end']:>10.2f} {r['descriptors']:>5}"
        )
    print(f"\n{report[-1]['tensors']} HF tensors installed in place from {report[-1]['sources']} trainer ranks.")
    return 0


def _wait_published(out: Any, world: int, version: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    seen = set()
    while len(seen) < world:
        kind, rank, value, _ = out.get(timeout=max(deadline - time.monotonic(), 0.1))
        if kind == "error":
            raise RuntimeError(f"trainer rank {rank} failed: {value}")
        if value == version:
            seen.add(rank)


if __name__ == "__main__":
    sys.exit(main())
