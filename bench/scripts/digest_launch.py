"""Micro-benchmark: the receiver's digest check of one staged chunk (launch + compare), per run vs batched.

A Llama-3-8B-shaped trainer at TP2 read by an engine at TP1 (QKV per-query-group rows, gate/up halves,
column slices of the row-parallel weights): the plan's chunk with the most pieces, staged with random
bytes whose digests are taken as published. `--scale` divides the hidden and MLP sizes (same pieces,
fewer bytes: the cost of issuing the digests rather than of reading the bytes).

    PYTHONPATH=$PWD:$PWD/server:$PWD/bench python bench/scripts/digest_launch.py --scale 16 --window 64
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from refit import digest
from refit.dtypes import torch_dtype
from refit.engines.base import EngineSpec
from refit.plan.planner import plan_refit
from refit.plan.verify import DigestIndex, Verifier
from refit.reads import batched as cut_batches
from refit.types import DigestSet
from refit_bench.trainer_sources import TrainerLayout, synthesize_sources

logger = logging.getLogger("digest_launch")


def _config(scale: int) -> dict[str, object]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 4096 // scale, "intermediate_size": 14336 // scale, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128 // scale,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=16, help="divide hidden, MLP and head sizes by this")
    ap.add_argument("--window", type=int, default=64, help="staging window, MiB")
    ap.add_argument("--trainer-tp", type=int, default=2)
    ap.add_argument("--direct-min", type=int, default=16, help="MiB: longer runs are direct reads (0: none)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    meta, sources = synthesize_sources(_config(args.scale), TrainerLayout(tp=args.trainer_tp))
    blocked = []
    for s in sources:
        tensors = tuple(digest.with_blocks(t) for t in s.tensors)
        values = np.zeros(digest.count(tensors), dtype="<i8").tobytes()  # set below from the staged bytes
        blocked.append(
            dataclasses.replace(s, tensors=tensors, digests=DigestSet(algorithm=digest.ALGORITHM, values=values))
        )
    spec = EngineSpec.from_meta(meta, tp_rank=0, tp_size=1)
    plan = plan_refit(
        model=meta,
        sources=blocked,
        layout=spec.layout(),
        window=args.window << 20,
        direct=(lambda t: True) if args.direct_min else None,
        direct_min_bytes=args.direct_min << 20,
    )
    chunk = max(plan.chunks, key=lambda c: len(c.pieces))
    slot = torch.randint(0, 256, (chunk.staging_bytes,), dtype=torch.uint8)
    index = DigestIndex(blocked)
    what = f"{len(chunk.pieces)} pieces, {chunk.staging_bytes / 2**20:.1f} MiB staged"
    _compare(args.repeats, index, blocked, f"chunk ({what})", lambda v: v.launch(chunk.pieces, slot))
    if plan.direct:
        reads = max(cut_batches(plan.direct, max(c.staging_bytes for c in plan.chunks)), key=len)
        shapes = {t.hf_name: (t.shape, torch_dtype(t.dtype)) for t in plan.targets}
        dests = {d.target: torch.randint(0, 100, shapes[d.target][0]).to(shapes[d.target][1]) for d in reads}
        what = f"{len(reads)} reads, {sum(d.nbytes for d in reads) / 2**20:.1f} MiB"
        _compare(args.repeats, index, blocked, f"direct batch ({what})", lambda v: v.launch_direct(reads, dests))


def _compare(repeats: int, index: DigestIndex, sources: list, what: str, launch: Callable[[Verifier], object]) -> None:
    """Time `launch` + compare, run by run and batched (a Verifier before batching: run by run only)."""
    results = {}
    for batched in (False, True):
        try:
            v = Verifier(index, sources, version=1, batched=batched)
        except TypeError:
            if batched:
                break
            v = Verifier(index, sources, version=1)
        t0 = time.perf_counter()
        first = launch(v)  # lays the check out (once per plan); its digests become the published ones
        _publish(v, first)
        v.compare(first)
        once = time.perf_counter() - t0
        with _CountOps() as ops:
            v.compare(launch(v))
        t0 = time.perf_counter()
        for _ in range(repeats):
            v.compare(launch(v))
        results[batched] = (time.perf_counter() - t0) / repeats
        logger.info("%s, %s: %d runs of blocks, %.3f ms (launch + compare; the first, laying it out: %.3f ms), "
                    "%d torch ops (%d of them kernels)", what, "batched" if batched else "per-run", len(first.checks),
                    1e3 * results[batched], 1e3 * once, ops.ops, ops.ops - ops.views)  # fmt: skip
    if len(results) == 2:
        logger.info("%s: batched / per-run %.2fx", what, results[True] / results[False])


class _CountOps(TorchDispatchMode):
    """Counts the aten ops issued (views apart: they launch nothing on a GPU, but cost host time)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        self.views += func.is_view or func.__name__.split(".")[0] in _VIEWS
        return func(*args, **(kwargs or {}))


_VIEWS = {"view", "as_strided", "slice", "select", "reshape", "_unsafe_view", "t", "expand", "unsqueeze", "alias",
          "detach", "_reshape_alias", "lift_fresh"}  # fmt: skip


def _publish(v: Verifier, pending: object) -> None:
    """Take the digests of the staged bytes as the published ones (private fields: a benchmark's shortcut)."""
    got = torch.cat(pending.got).numpy()  # type: ignore[attr-defined]
    if hasattr(pending, "want"):
        v._flat[np.concatenate(pending.want)] = got
        return
    at = 0
    for c in pending.checks:  # type: ignore[attr-defined]
        values = v._values[c.rank] = v._values[c.rank].copy()
        values[c.entry.first + c.block : c.entry.first + c.block + c.count] = got[at : at + c.count]
        at += c.count


if __name__ == "__main__":
    main()
