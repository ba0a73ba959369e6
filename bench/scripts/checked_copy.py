"""Micro-benchmark: a refit's direct reads copied and then digested, against copied and digested in one pass.

A Llama-3-8B-shaped trainer rank (`--layers` layers, bf16, random bytes in one GPU region, digests
published from them) read by an engine at TP1 on the same GPU, its direct reads cut into the
receiver's batches. Timed: one copy of the trainer's whole region (the copy's ceiling), the check of
every batch where its bytes landed (`Verifier.launch_direct`: the second pass), and every batch copied
and checked in one pass (`Verifier.copy_direct`, `refit.plan.checked_copy`), the batches on one side
stream. GPU time (events) and host time of issuing, medians of `--iters`; the engine tensors are then
compared with the trainer's bytes.

    PYTHONPATH=$PWD:$PWD/server:$PWD/bench python bench/scripts/checked_copy.py --layers 16
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from refit import digest
from refit.dtypes import torch_dtype
from refit.engines.base import EngineSpec
from refit.plan.planner import plan_refit
from refit.plan.verify import DigestIndex, Pending, Verifier
from refit.reads import batch_bytes, batched
from refit_bench.trainer_sources import TrainerLayout, synthesize_sources


def _config(layers: int) -> dict[str, object]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": layers, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}  # fmt: skip


def _time(fn: Callable[[], Pending], verifier: Verifier, iters: int) -> tuple[float, float]:
    gpu, host = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        pending = fn()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        end.record()
        end.synchronize()
        verifier.compare(pending)
        gpu.append(start.elapsed_time(end) / 1e3)
    return statistics.median(gpu), statistics.median(host)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--streams", type=int, default=1, help="side streams the one-pass batches take turns on")
    args = ap.parse_args()
    meta, sources = synthesize_sources(_config(args.layers), TrainerLayout(tp=1))
    (src,) = sources
    src = dataclasses.replace(src, tensors=tuple(digest.with_blocks(t) for t in src.tensors))
    region = torch.randint(0, 256, (src.regions[0].nbytes,), dtype=torch.uint8, device="cuda")
    src = dataclasses.replace(src, digests=digest.pack([digest.shard_digests(region, t) for t in src.tensors]))
    spec = EngineSpec.from_meta(meta, tp_rank=0, tp_size=1)
    plan = plan_refit(model=meta, sources=[src], layout=spec.layout(), window=1 << 30, direct=lambda t: True)
    groups = batched(plan.direct, batch_bytes(plan))
    dests = {t.hf_name: torch.zeros(t.shape, dtype=torch_dtype(t.dtype), device="cuda") for t in plan.targets}
    mapped = {(0, 0): region}
    index = DigestIndex([src])
    side = torch.cuda.Stream()
    flat = {n: t.view(-1).view(torch.uint8) for n, t in dests.items()}
    nbytes = sum(d.nbytes for d in plan.direct)

    def check(v: Verifier) -> Pending:  # the second pass: the bytes where they landed
        pending = Pending()
        with torch.cuda.stream(side):
            for g in groups:
                pending.extend(v.launch_direct(g, dests))
        return pending

    sides = [side] + [torch.cuda.Stream() for _ in range(args.streams - 1)]

    def one_pass(v: Verifier) -> Pending:
        pending = Pending()
        for k, g in enumerate(groups):
            s = sides[k % len(sides)]
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                pending.extend(v.copy_direct(g, dests, mapped))
        for s in sides:
            torch.cuda.current_stream().wait_stream(s)
        return pending

    whole = torch.empty_like(region)
    copy_s, _ = _time(lambda: (whole.copy_(region), Pending())[1], Verifier(index, [src], version=1), args.iters)
    print(f"one copy of the trainer's region ({region.numel() / 1e9:.2f} GB): {copy_s * 1e3:.2f} ms")
    for d in plan.direct:  # the bytes landed, for the check alone
        flat[d.target][d.offset : d.offset + d.nbytes].copy_(region[d.remote_offset : d.remote_offset + d.nbytes])
    for name, fn in (("the check alone, where the bytes landed", check), ("copied and checked in one pass", one_pass)):
        v = Verifier(index, [src], version=1)
        if fn is one_pass:
            assert all(v.copier(g, dests, mapped) is not None for g in groups)
            for t in dests.values():
                t.zero_()
        gpu, host = _time(lambda fn=fn, v=v: fn(v), v, args.iters)
        print(f"{name}: {len(groups)} batches, {len(plan.direct)} reads, {nbytes / 1e9:.2f} GB: GPU {gpu * 1e3:.2f} ms "
              f"({nbytes / gpu / 1e9:.0f} GB/s), issued in {host * 1e3:.2f} ms")  # fmt: skip
    for d in plan.direct:
        assert torch.equal(
            flat[d.target][d.offset : d.offset + d.nbytes], region[d.remote_offset : d.remote_offset + d.nbytes]
        )
    batches = [layout.batch for _, layout in index.layouts.values() if layout.batch is not None]
    captured = [g for b in batches for g in b._graphs.values()]
    print(f"graphs captured: {sum(g is not None for g in captured)} of {len(captured)}")


if __name__ == "__main__":
    main()
