"""Megatron -> Megatron refits: a Megatron-Core GPTModel as the engine, at its own TP.

Trainer ranks (the shared 8-process cluster) publish native shards; a separate 2-process cluster of
engine ranks builds GPTModels at the engine's TP and refits them through `MegatronEngine`, with
QKV re-interleaved for the engine's TP and no Hugging Face names on the way. Every parameter must
then equal the HF ground truth converted at the engine's TP, and the logits must match.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import hf_models as hm
from tests.support.cluster import TrainerCluster
from tests.support.refit_harness import OPS, write_state

ENGINE = "tests.support.engine_ops"


@pytest.fixture(scope="module")
def engine_cluster() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=2, timeout_s=300.0) as cluster:
        yield cluster


@pytest.mark.parametrize(
    ("case", "trainer_tp", "engine_tp"),
    [
        pytest.param(hm.LLAMA_GQA, 2, 1, id="gqa-trainer-tp2-engine-tp1"),
        pytest.param(hm.LLAMA_GQA, 1, 2, id="gqa-trainer-tp1-engine-tp2"),
        pytest.param(hm.QWEN3_QKNORM, 1, 2, id="qwen3-trainer-tp1-engine-tp2"),
        pytest.param(hm.LLAMA_PAD384, 1, 2, id="engine-pads-vocab-further"),
    ],
)
def test_megatron_engine_refit_is_bit_exact(trainer, catalog, engine_cluster, tmp_path, case, trainer_tp, engine_tp):
    t = trainer(case, tp=trainer_tp, pp=1)
    garbage = write_state(hm.build_hf_model(case, seed=42), tmp_path / "engine-init.safetensors")
    truth1 = write_state(t.hf, tmp_path / "truth1.safetensors")
    engine_cluster.run(f"{ENGINE}:build_pair", case=case.id, init_path=str(garbage), truth_path=str(truth1),
                       tp=engine_tp)  # fmt: skip
    t.publish(1)
    for out in engine_cluster.run(f"{ENGINE}:refit_and_compare", catalog=catalog, name=t.name):
        assert out["version"] == 1 and out["bytes"] > 0
        assert out["differ"] == [], f"parameters differ from the ground truth: {out['differ']}"
        assert out["storage_kept"]
    assert all(engine_cluster.run(f"{ENGINE}:logits_equal"))

    # A second version changes every tensor; the engine follows, in place.
    v2 = t.step(seed=2)
    t.cluster.run(f"{OPS}:invalidate", name=t.name)
    t.publish(2)
    truth2 = write_state(v2, tmp_path / "truth2.safetensors")
    engine_cluster.run("tests.support.trainer_ops:load", key="truth", hf_path=str(truth2))
    for out in engine_cluster.run(f"{ENGINE}:refit_and_compare", catalog=catalog, name=t.name):
        assert out["version"] == 2 and out["differ"] == [] and out["storage_kept"]


WINDOW = 64 << 10  # bytes: far below the test models, so every refit streams through many chunks


@pytest.mark.parametrize(
    ("case", "trainer_tp", "engine_tp"),
    [
        pytest.param(hm.LLAMA_GQA, 2, 1, id="gqa-trainer-tp2-engine-tp1"),
        pytest.param(hm.QWEN3_QKNORM, 1, 2, id="qwen3-trainer-tp1-engine-tp2"),
    ],
)
def test_megatron_engine_streams_through_a_tiny_window_bit_exact(
    trainer, catalog, engine_cluster, tmp_path, case, trainer_tp, engine_tp
) -> None:
    # QKV re-interleaved for the engine's TP, fc1's [gate; up] regrouped and row-parallel columns, in
    # chunks of a 64 KiB window beside reads straight into the engine's parameters.
    t = trainer(case, tp=trainer_tp, pp=1)
    garbage = write_state(hm.build_hf_model(case, seed=42), tmp_path / "engine-init.safetensors")
    truth1 = write_state(t.hf, tmp_path / "truth1.safetensors")
    engine_cluster.run(f"{ENGINE}:build_pair", case=case.id, init_path=str(garbage), truth_path=str(truth1),
                       tp=engine_tp)  # fmt: skip
    window = dict(max_staging_bytes=WINDOW, direct_min_bytes=0)
    for version in (1, 2):
        if version == 2:  # a second version changes every tensor; the engine follows, in place
            v2 = t.step(seed=2)
            t.cluster.run(f"{OPS}:invalidate", name=t.name)
            engine_cluster.run("tests.support.trainer_ops:load", key="truth",
                               hf_path=str(write_state(v2, tmp_path / "truth2.safetensors")))  # fmt: skip
        t.publish(version)
        for out in engine_cluster.run(f"{ENGINE}:refit_and_compare", catalog=catalog, name=t.name, **window):
            assert out["version"] == version
            assert out["differ"] == [], f"parameters differ from the ground truth: {out['differ']}"
            assert out["storage_kept"] and out["direct_bytes"] > 0
            assert out["chunks"] > 1 and 0 < out["peak_staging_bytes"] <= WINDOW
        assert all(engine_cluster.run(f"{ENGINE}:logits_equal"))
