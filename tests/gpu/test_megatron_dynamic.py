"""A running Megatron dynamic inference engine (megatron-core 0.19, `MegatronLLM` / `MegatronAsyncLLM` in
coordinator mode) refitted between pauses: one GPU, real NIXL, real gRPC catalog.

GPU only: megatron-core 0.19.2's `DynamicInferenceContext` allocates pinned host memory and CUDA
tensors when built (a CPU-only machine fails with "Found no NVIDIA driver"), and its attention runs
FlashAttention kernels (FA4 on the H200). On the device: `bash bench/scripts/gpu_megatron_dynamic.sh`.

Two trainer ranks (TP 2, CPU, gloo) publish a bf16 llama-shaped model; the engine (TP 1, GPU 0) runs in
its own process, built from unrelated weights. Per case:

1. refit to v1 on the idle engine: every parameter equals the v1 checkpoint converted by the test's own
   converter, in its original storage;
2. the trainer steps (every weight changes) and publishes v2; the engine generates for three prompts and,
   once each has `MIN_BEFORE` tokens, is refitted to v2 while they run (prefetch, pause, suspend,
   install, resume, unpause). Each token reports the version that produced it: a run of 1s, then 2s;
3. greedy tokens after the refit (a prompt seen before the refit among them) equal those of a fresh
   engine built from the v2 checkpoint, given the same batches in the same order. With KV mode
   "recompute", the crossing requests' tokens after the refit also equal the fresh engine's
   continuation of their prompt plus the tokens of v1 (no KV entry of the old weights was used).

Cases: sync facade, "recompute" with prefix caching (Megatron drops the KV and prefix caches at resume);
async facade, "persist" with CUDA graphs (graphs captured before the refit are replayed after it, and
`keep_stale_kv`: requests in flight keep their old-weight KV, which `kv_cache_epoch` records).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator

import pytest
import torch

from tests.support import dynamic_ops
from tests.support import hf_models as hm
from tests.support.cluster import TrainerCluster
from tests.support.refit_harness import OPS, Trainer, write_state


def _missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    for module in ("megatron.core.inference.apis", "zmq", "msgpack"):
        if importlib.util.find_spec(module.split(".")[0]) is None or (
            module.startswith("megatron") and importlib.util.find_spec(module) is None
        ):
            return f"needs {module} (megatron-core >= 0.19 with pyzmq and msgpack)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")

ENGINE = "tests.support.dynamic_ops"
CASE = dynamic_ops.CASE
PROMPT_LEN = 300  # over one KV block (256 tokens): prefix caching matches whole blocks
TOKENS = 160
MIN_BEFORE = 4
SLOW = 600.0  # engine start-up, CUDA-graph capture and FlashAttention-4's first compiles (~3 s each)


@pytest.fixture(scope="module")
def catalog() -> Iterator[str]:
    from refit_server import CatalogServer

    with CatalogServer(store="memory", port=0).start() as server:
        yield server.address


@pytest.fixture(scope="module")
def trainers() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=2, timeout_s=300.0) as cluster:
        yield cluster


@contextlib.contextmanager
def _engine() -> Iterator[TrainerCluster]:
    """One engine rank on GPU 0; its facade (and the coordinator process Megatron spawned) is shut down after."""
    # Not daemonic: the facade spawns Megatron's inference coordinator from the worker.
    with TrainerCluster(world_size=1, cuda=True, timeout_s=600.0, daemon=False) as cluster:
        try:
            yield cluster
        finally:
            with contextlib.suppress(Exception):
                cluster.run(f"{ENGINE}:shutdown", timeout_s=120.0)


def _record(case: str, **reports: object) -> None:
    """Append this case's refit reports to $REFIT_TEST_REPORT (the GPU script points it at $OUT)."""
    path = os.environ.get("REFIT_TEST_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, **reports}) + "\n")


@pytest.mark.parametrize(
    ("facade", "kv_mode", "cuda_graphs", "prefix_caching"),
    [
        pytest.param("sync", "recompute", False, True, id="sync-recompute-prefix-cache"),
        pytest.param("async", "persist", True, False, id="async-persist-cuda-graphs"),
    ],
)
def test_refit_running_dynamic_engine(trainers, catalog, tmp_path, facade, kv_mode, cuda_graphs, prefix_caching):
    options = dict(facade=facade, kv_mode=kv_mode, cuda_graphs=cuda_graphs, prefix_caching=prefix_caching)
    t = Trainer(trainers, catalog, tmp_path, CASE, tp=2)
    t.publish(1)
    v1 = write_state(t.hf, tmp_path / "v1.safetensors")
    init = write_state(hm.build_hf_model(CASE, seed=42), tmp_path / "init.safetensors")
    crossing_prompts = dynamic_ops.prompts(3, PROMPT_LEN, seed=7)
    # A prompt generated to completion on v1 leaves its KV blocks in the prefix cache (reference count 0);
    # after the refit it is asked again, with two new prompts: it must not reuse the old weights' blocks.
    probe = dynamic_ops.prompts(1, PROMPT_LEN, seed=9)[0]
    after_prompts = [probe, *dynamic_ops.prompts(2, PROMPT_LEN, seed=8)]

    with _engine() as engine:
        [info] = engine.run(f"{ENGINE}:start", timeout_s=SLOW, hf_path=str(init), **options)
        assert info["fa4"], "megatron-core did not find FlashAttention-4"
        assert engine.run(f"{ENGINE}:attach", catalog=catalog, name=t.name) == [kv_mode]

        [r1] = engine.run(f"{ENGINE}:refit", timeout_s=SLOW, version=1)
        assert r1["version"] == 1 and r1["bytes"] > 0 and r1["storage_kept"]
        assert r1["chunks"] == 1  # the whole version was prefetched; the stall held only the install
        assert engine.run(f"{ENGINE}:differing", hf_path=str(v1)) == [[]]
        [probed] = engine.run(f"{ENGINE}:generate", timeout_s=SLOW, prompts=[probe], tokens=8)
        assert probed[0]["versions"] == [1] * 8

        v2_model = t.step(seed=2)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        v2 = write_state(v2_model, tmp_path / "v2.safetensors")

        [cross] = engine.run(
            f"{ENGINE}:crossing", timeout_s=SLOW, prompts=crossing_prompts, tokens=TOKENS, version=2,
            min_before=MIN_BEFORE,
        )  # fmt: skip
        report = cross["report"]
        assert report["version"] == 2 and cross["storage_kept"]
        assert report["policy"]["recomputes_kv"] == (kv_mode == "recompute")
        assert engine.run(f"{ENGINE}:differing", hf_path=str(v2)) == [[]]
        before = []
        for out in cross["outputs"]:
            versions = out["versions"]
            assert len(out["tokens"]) == len(versions) == TOKENS
            k = versions.count(1)
            # The request crossed the refit: tokens of v1 first, at least those seen before it started, then v2.
            assert versions == [1] * k + [2] * (TOKENS - k), versions
            assert cross["seen_before_refit"] <= k < TOKENS
            if kv_mode == "persist":  # its KV entries of the old weights were kept (and are recorded so)
                assert out["kv_versions"][PROMPT_LEN + k - 2] == 1
            else:  # checkpointed at suspend, prefilled again with v2: Megatron records all its KV as v2
                assert set(out["kv_versions"]) == {2}
            before.append(k)

        after = engine.run(f"{ENGINE}:generate", timeout_s=SLOW, prompts=after_prompts, tokens=TOKENS)[0]
        assert all(o["versions"] == [2] * TOKENS for o in after)
    _record(f"{facade}-{kv_mode}", idle=r1, crossing=report, seen_before_refit=cross["seen_before_refit"],
            tokens_of_v1=before)  # fmt: skip

    # The same batches on a fresh engine built from the v2 checkpoint (continuations first: they ran
    # right after the resume on the refitted engine, before the prompts after the refit).
    continuations = [p + o["tokens"][:k] for p, o, k in zip(crossing_prompts, cross["outputs"], before, strict=True)]
    with _engine() as fresh:
        fresh.run(f"{ENGINE}:start", timeout_s=SLOW, hf_path=str(v2), **options)
        fresh.run(f"{ENGINE}:attach", catalog=catalog, name=t.name)
        fresh.run(f"{ENGINE}:mark", version=2)
        if kv_mode == "recompute":
            # Submitted in one batch, the crossing requests decode in lockstep: they crossed at the same
            # token, were re-prefilled together at resume, and are one batch here too.
            assert len(set(before)) == 1, before
            [cont] = fresh.run(f"{ENGINE}:generate", timeout_s=SLOW, prompts=continuations, tokens=TOKENS - before[0])
            for got, want, k in zip(cross["outputs"], cont, before, strict=True):
                assert got["tokens"][k:] == want["tokens"], "the crossing request used KV of the old weights"
        [want_after] = fresh.run(f"{ENGINE}:generate", timeout_s=SLOW, prompts=after_prompts, tokens=TOKENS)
        assert [o["tokens"] for o in after] == [o["tokens"] for o in want_after]
    t.close()
