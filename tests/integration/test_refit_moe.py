"""Mixture-of-experts refits end to end on real parts: megatron-core MoE GPTModels on the trainer
cluster (TP, EP, expert TP, PP; the rest data / expert-data parallel) publish their native shards,
experts under their global ids; receivers pull over NIXL into a Hugging Face engine (every expert)
and into Megatron engine ranks with their own EP (only the experts each owns). Every tensor is then
bit-identical to the HF model the trainer weights were converted from, after v1 and after a v2 that
changed every parameter in place; logits are equal, on routing the cases make decisive.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from refit import Receiver
from refit.engines import HFEngine
from refit.errors import ModelMismatchError
from tests.support import hf_models as hm
from tests.support.cluster import TrainerCluster
from tests.support.refit_harness import OPS, assert_same_logits, assert_same_weights, write_state

ENGINE = "tests.support.engine_ops"


def _layout(case: hm.ModelCase, tp: int, ep: int, etp: int, pp: int):
    return pytest.param(case, dict(tp=tp, ep=ep, etp=etp, pp=pp), id=f"{case.id}-tp{tp}-ep{ep}-etp{etp}-pp{pp}")


# Every trainer layout of TP {1, 2} x EP {1, 2, 4} x ETP {1, 2} x PP {1, 2} that fits 8 processes (the
# rest of the world is data / expert-data parallel), each with one of the cases (shared experts, dense
# layers among MoE layers, a stage boundary across both), plus a few chosen pairs and bf16.
_CHOSEN = [
    (hm.QWEN3_MOE, 1, 2, 1, 1),
    (hm.QWEN2_MOE, 2, 2, 2, 2),
    (hm.MIXTRAL, 1, 4, 2, 1),
    (hm.QWEN3_MOE, 2, 1, 2, 2),
    (hm.QWEN3_MOE_BF16, 2, 2, 2, 1),
]
_GRID = [
    (case, tp, ep, etp, pp)
    for tp in (1, 2)
    for ep in (1, 2, 4)
    for etp in (1, 2)
    for pp in (1, 2)
    if etp * ep * pp <= 8 and tp * pp <= 8
    for case in (hm.MOE_CASES[(tp + ep + etp + pp) % 3],)
]
LAYOUTS = [_layout(*c) for c in _CHOSEN] + [_layout(*c) for c in _GRID if c not in _CHOSEN]


@pytest.mark.parametrize(("case", "layout"), LAYOUTS)
def test_moe_refit_into_hf_is_bit_exact_for_two_versions(trainer, catalog, case, layout) -> None:
    t = trainer(case, **layout)
    engine_model = hm.build_hf_model(case, seed=99)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv:
        storage = {n: p.data_ptr() for n, p in engine_model.named_parameters()}
        t.publish(1)
        r1 = rcv.update_weights()
        assert r1.version == 1
        # The HF engine holds every expert: the refit moved exactly the model's bytes.
        assert r1.bytes == sum(p.numel() * p.element_size() for p in t.hf.parameters())
        assert_same_weights(engine_model, t.hf)
        assert_same_logits(engine_model, t.hf)

        v2 = t.step(seed=2)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        assert rcv.update_weights().version == 2
        assert_same_weights(engine_model, v2)
        assert_same_logits(engine_model, v2)
        assert storage == {n: p.data_ptr() for n, p in engine_model.named_parameters()}


@pytest.fixture(scope="module")
def engine_cluster() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=2, timeout_s=300.0) as cluster:
        yield cluster


@pytest.mark.parametrize(
    ("case", "trainer_layout"),
    [
        pytest.param(hm.QWEN2_MOE, dict(tp=2, ep=4, etp=1, pp=1), id="qwen2-moe-trainer-tp2-ep4"),
        pytest.param(hm.QWEN3_MOE, dict(tp=1, ep=1, etp=2, pp=2), id="qwen3-moe-trainer-ep1-etp2-pp2"),
    ],
)
def test_megatron_engine_with_ep2_pulls_only_its_experts(trainer, catalog, engine_cluster, tmp_path, case,
                                                          trainer_layout) -> None:  # fmt: skip
    t = trainer(case, **trainer_layout)
    garbage = write_state(hm.build_hf_model(case, seed=42), tmp_path / "engine-init.safetensors")
    truth1 = write_state(t.hf, tmp_path / "truth1.safetensors")
    engine_cluster.run(f"{ENGINE}:build_pair", case=case.id, init_path=str(garbage), truth_path=str(truth1),
                       tp=1, ep=2)  # fmt: skip
    t.publish(1)
    model_bytes = sum(p.numel() * p.element_size() for p in t.hf.parameters())
    expert_bytes = sum(p.numel() * p.element_size() for n, p in t.hf.named_parameters() if ".mlp.experts." in n)
    for out in engine_cluster.run(f"{ENGINE}:refit_and_compare", catalog=catalog, name=t.name):
        assert out["version"] == 1
        assert out["differ"] == [], f"parameters differ from the ground truth: {out['differ']}"
        assert out["storage_kept"]
        # Each engine rank pulled its parameters' bytes and nothing else: half of the experts.
        assert out["bytes"] == out["param_bytes"] == model_bytes - expert_bytes // 2
    assert all(engine_cluster.run(f"{ENGINE}:logits_equal"))

    v2 = t.step(seed=2)
    t.cluster.run(f"{OPS}:invalidate", name=t.name)
    t.publish(2)
    engine_cluster.run("tests.support.trainer_ops:load", key="truth",
                       hf_path=str(write_state(v2, tmp_path / "truth2.safetensors")))  # fmt: skip
    for out in engine_cluster.run(f"{ENGINE}:refit_and_compare", catalog=catalog, name=t.name):
        assert out["version"] == 2 and out["differ"] == [] and out["storage_kept"]
    assert all(engine_cluster.run(f"{ENGINE}:logits_equal"))


def _refused(catalog: str, name: str, model: torch.nn.Module, field: str) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with Receiver(catalog=catalog, engine=HFEngine(model), name=name) as rcv:
        with pytest.raises(ModelMismatchError, match=field):
            rcv.update_weights()
        assert rcv.stats.registrations == 0  # refused before any staging was registered or pulled into
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_moe_and_dense_models_refuse_each_other_before_any_pull(trainer, catalog) -> None:
    """A dense engine against a MoE version and the reverse, and engines whose experts differ in
    number or size: refused before any pull, naming the field, and the engine keeps its weights."""
    moe = trainer(hm.QWEN3_MOE, tp=1, ep=2, etp=1, pp=1)
    moe.publish(1)
    _refused(catalog, moe.name, hm.build_hf_model(hm.QWEN3_QKNORM, seed=5), "num_experts")
    cfg = hm.QWEN3_MOE.hf_config
    more = hm.ModelCase("qwen3-moe-8e", "qwen3_moe", {**cfg, "num_experts": 8})
    _refused(catalog, moe.name, hm.build_hf_model(more, seed=5), "num_experts")
    wider = hm.ModelCase("qwen3-moe-f64", "qwen3_moe", {**cfg, "moe_intermediate_size": 64})
    _refused(catalog, moe.name, hm.build_hf_model(wider, seed=5), "moe_ffn_hidden_size")

    dense = trainer(hm.QWEN3_QKNORM, tp=2, pp=1)
    dense.publish(1)
    _refused(catalog, dense.name, hm.build_hf_model(hm.QWEN3_MOE, seed=5), "num_experts")
