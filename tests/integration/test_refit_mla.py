"""DeepSeek-V3-architecture refits end to end on real parts: megatron-core GPTModels with multi-latent
attention and DeepSeek MoE layers (a dense first layer, then a sigmoid router with its `expert_bias`
buffer, grouped routing, routed experts and one shared expert) on the trainer cluster publish their
native shards; a Hugging Face `DeepseekV3ForCausalLM` engine pulls them over NIXL, and so do Megatron
engine ranks with their own EP (only the experts each owns) or TP (only their slices). Every tensor
and the router bias buffers are then bit-identical to the HF model the trainer weights were converted
from (the independent converter of tests/support/megatron_mla_convert.py, verified against logits by
test_ground_truth_mla.py), after v1 and after a v2 that changed every weight and bias in place; the
logits are equal. With and without a query latent (`q_lora_rank`). Engines of another attention, other
rope dims or another KV latent are refused before any pull, naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from refit import Receiver
from refit.engines import HFEngine
from refit.errors import ModelMismatchError
from tests.support import hf_models as hm
from tests.support.cluster import TrainerCluster
from tests.support.refit_harness import OPS, assert_same_logits, write_state
from tests.support.refit_harness import assert_same_state as same_state

ENGINE = "tests.support.engine_ops"


def _layout(case: hm.ModelCase, tp: int, ep: int, etp: int, pp: int):
    return pytest.param(case, dict(tp=tp, ep=ep, etp=etp, pp=pp), id=f"{case.id}-tp{tp}-ep{ep}-etp{etp}-pp{pp}")


LAYOUTS = [
    _layout(hm.DEEPSEEK_V3, tp=2, ep=2, etp=1, pp=1),
    _layout(hm.DEEPSEEK_V3, tp=1, ep=2, etp=1, pp=2),
    _layout(hm.DEEPSEEK_V3_NO_QLORA, tp=2, ep=2, etp=1, pp=1),
    _layout(hm.DEEPSEEK_V3_NO_QLORA, tp=1, ep=2, etp=1, pp=2),
]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers (the router's `e_score_correction_bias`)."""
    return model.state_dict(keep_vars=True)


def assert_same_state(engine_model: torch.nn.Module, source: torch.nn.Module) -> None:
    assert any(n.endswith(".e_score_correction_bias") for n in _state(source))
    same_state(engine_model, source)


def _storage(model: torch.nn.Module) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in _state(model).items()}


@pytest.mark.parametrize(("case", "layout"), LAYOUTS)
def test_mla_refit_into_hf_is_bit_exact_for_two_versions(trainer, catalog, case, layout) -> None:
    t = trainer(case, **layout)
    engine_model = hm.build_hf_model(case, seed=99)
    assert not torch.equal(_state(engine_model)["model.layers.1.mlp.gate.e_score_correction_bias"],
                           _state(t.hf)["model.layers.1.mlp.gate.e_score_correction_bias"])  # fmt: skip
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv:
        storage = _storage(engine_model)
        t.publish(1)
        r1 = rcv.update_weights()
        assert r1.version == 1
        # The HF engine holds the whole model: the refit moved exactly its weights' and biases' bytes.
        assert r1.bytes == sum(v.numel() * v.element_size() for v in _state(t.hf).values())
        assert_same_state(engine_model, t.hf)
        assert_same_logits(engine_model, t.hf)

        v2 = t.step(seed=2)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        assert rcv.update_weights().version == 2
        assert_same_state(engine_model, v2)
        assert_same_logits(engine_model, v2)
        assert storage == _storage(engine_model)


@pytest.fixture(scope="module")
def engine_cluster() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=2, timeout_s=300.0) as cluster:
        yield cluster


@pytest.mark.parametrize(
    ("case", "trainer_layout", "engine_layout"),
    [
        pytest.param(hm.DEEPSEEK_V3, dict(tp=2, ep=2, etp=1, pp=1), dict(tp=1, ep=2), id="trainer-tp2-ep2-engine-ep2"),
        pytest.param(hm.DEEPSEEK_V3_NO_QLORA, dict(tp=1, ep=2, etp=1, pp=2), dict(tp=1, ep=2),
                     id="no-qlora-trainer-pp2-ep2-engine-ep2"),
        # Engine TP 2 (local spec): the q / kv down projections split by rows, the kv one across its
        # [latent | rope] concatenation; experts split by expert TP 2.
        pytest.param(hm.DEEPSEEK_V3, dict(tp=1, ep=2, etp=1, pp=2), dict(tp=2, ep=1),
                     id="trainer-pp2-ep2-engine-tp2-etp2"),
    ],
)  # fmt: skip
def test_megatron_engine_pulls_only_its_slices_and_experts(trainer, catalog, engine_cluster, tmp_path, case,
                                                           trainer_layout, engine_layout) -> None:  # fmt: skip
    t = trainer(case, **trainer_layout)
    garbage = write_state(hm.build_hf_model(case, seed=42), tmp_path / "engine-init.safetensors")
    truth1 = write_state(t.hf, tmp_path / "truth1.safetensors")
    engine_cluster.run(f"{ENGINE}:build_pair", case=case.id, init_path=str(garbage), truth_path=str(truth1),
                       **engine_layout)  # fmt: skip
    t.publish(1)
    state = _state(t.hf)
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    expert_bytes = sum(v.numel() * v.element_size() for n, v in state.items() if ".mlp.experts." in n)
    for out in engine_cluster.run(f"{ENGINE}:refit_and_compare", catalog=catalog, name=t.name):
        assert out["version"] == 1
        assert out["differ"] == [], f"state differs from the ground truth: {out['differ']}"
        assert out["biases"] == sum(case.moe_layers)  # one per MoE layer, compared too
        assert out["storage_kept"]
        # Each engine rank pulled its own weights' and biases' bytes and nothing else.
        assert out["bytes"] == out["state_bytes"]
        if engine_layout["ep"] == 2:  # every dense tensor whole, half of the experts
            assert out["bytes"] == model_bytes - expert_bytes // 2
    assert all(engine_cluster.run(f"{ENGINE}:logits_equal"))

    v2 = t.step(seed=2)
    t.cluster.run(f"{OPS}:invalidate", name=t.name)
    t.publish(2)
    engine_cluster.run("tests.support.trainer_ops:load", key="truth",
                       hf_path=str(write_state(v2, tmp_path / "truth2.safetensors")))  # fmt: skip
    for out in engine_cluster.run(f"{ENGINE}:refit_and_compare", catalog=catalog, name=t.name):
        assert out["version"] == 2 and out["differ"] == [] and out["storage_kept"]
    assert all(engine_cluster.run(f"{ENGINE}:logits_equal"))


def _refused(catalog: str, name: str, model: torch.nn.Module, *fields: str) -> None:
    before = {n: v.detach().clone() for n, v in _state(model).items()}
    with Receiver(catalog=catalog, engine=HFEngine(model), name=name) as rcv:
        with pytest.raises(ModelMismatchError) as err:
            rcv.update_weights()
        assert rcv.stats.registrations == 0  # refused before any staging was registered or pulled into
    for field in fields:
        assert field in str(err.value), (field, str(err.value))
    assert all(torch.equal(v, before[n]) for n, v in _state(model).items())


def _variant(case_id: str, **overrides: object) -> hm.ModelCase:
    return dataclasses.replace(hm.DEEPSEEK_V3, id=case_id, hf_config={**hm.DEEPSEEK_V3.hf_config, **overrides})


def test_mla_models_refuse_other_attention_before_any_pull(trainer, catalog) -> None:
    """A GQA MoE engine of the same size (layers, hidden, heads, head output, experts, FFNs), and MLA
    engines with other rope / no-rope dims or another KV latent: refused before any pull, naming the
    field, and the engine keeps its weights."""
    mla = trainer(hm.DEEPSEEK_V3, tp=2, ep=2, etp=1, pp=1)
    mla.publish(1)
    cfg = hm.DEEPSEEK_V3.hf_config
    gqa = hm.ModelCase(
        "qwen3-moe-like-dsv3",
        "qwen3_moe",
        hm._cfg(
            num_hidden_layers=cfg["num_hidden_layers"], intermediate_size=cfg["intermediate_size"],
            num_key_value_heads=cfg["num_attention_heads"], head_dim=cfg["v_head_dim"], num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=cfg["moe_intermediate_size"], mlp_only_layers=[0],
        ),
    )  # fmt: skip
    _refused(catalog, mla.name, hm.build_hf_model(gqa, seed=5), "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
    # Same q head width (nope + rope = 24), the rope part moved: the rows would land in the wrong place.
    rope = _variant("dsv3-rope4", qk_rope_head_dim=4, qk_nope_head_dim=20)
    _refused(catalog, mla.name, hm.build_hf_model(rope, seed=5), "qk_rope_head_dim", "qk_nope_head_dim")
    latent = _variant("dsv3-kv16", kv_lora_rank=16)
    _refused(catalog, mla.name, hm.build_hf_model(latent, seed=5), "kv_lora_rank")
    no_q_latent = _variant("dsv3-no-qlora-refused", q_lora_rank=None)
    _refused(catalog, mla.name, hm.build_hf_model(no_q_latent, seed=5), "q_lora_rank")
