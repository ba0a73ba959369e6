"""The MLA ground-truth converter's own contract (the conventions themselves are verified against HF
logits in tests/integration/test_ground_truth_mla.py): every Megatron tensor is a whole-row (or, for
`linear_proj`, whole-column) TP block of the HF tensor it comes from, nothing is dropped, and layouts or
configs whose Megatron form would compute something else are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.support import hf_models as hm
from tests.support import megatron_mla
from tests.support.megatron_mla_convert import hf_to_megatron_mla_local

# Megatron (decoder.layers.{i}.self_attention.*) <- HF (model.layers.{i}.self_attn.*), TP split dim.
ATTENTION = {
    "linear_q_down_proj.weight": ("q_a_proj.weight", 0),
    "q_layernorm.weight": ("q_a_layernorm.weight", None),
    "linear_q_up_proj.weight": ("q_b_proj.weight", 0),
    "linear_q_proj.weight": ("q_proj.weight", 0),
    "linear_kv_down_proj.weight": ("kv_a_proj_with_mqa.weight", 0),
    "kv_layernorm.weight": ("kv_a_layernorm.weight", None),
    "linear_kv_up_proj.weight": ("kv_b_proj.weight", 0),
    "linear_proj.weight": ("o_proj.weight", 1),
}


def convert(case: hm.ModelCase, sd: dict, tp: int, tp_rank: int, **kw) -> dict[str, torch.Tensor]:
    layers = list(range(case.num_layers))
    vocab = hm.padded_vocab(case, tp)
    return hf_to_megatron_mla_local(
        sd,
        case,
        tp_size=tp,
        tp_rank=tp_rank,
        layers=layers,
        pre_process=True,
        post_process=True,
        padded_vocab=vocab,
        **kw,
    )


@pytest.mark.parametrize("case", hm.MLA_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_attention_and_router_are_tp_blocks_of_the_hf_tensors(case: hm.ModelCase, tp: int) -> None:
    sd = hm.build_hf_model(case, seed=0).state_dict()
    shards = [convert(case, sd, tp, r) for r in range(tp)]
    q_lora = case.hf_config["q_lora_rank"] is not None
    for layer in range(case.num_layers):
        dst, src = f"decoder.layers.{layer}.self_attention.", f"model.layers.{layer}.self_attn."
        names = {n for n in shards[0] if n.startswith(dst)}
        q_latent = {"linear_q_down_proj.weight", "q_layernorm.weight", "linear_q_up_proj.weight"}
        absent = {"linear_q_proj.weight"} if q_lora else q_latent
        assert names == {dst + n for n in ATTENTION if n not in absent}
        for name in names:
            hf, dim = ATTENTION[name.removeprefix(dst)]
            whole = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
            assert torch.equal(whole, sd[src + hf]), name
            assert dim is not None or all(torch.equal(s[name], whole) for s in shards), name
        if case.moe_layers[layer]:
            router = f"decoder.layers.{layer}.mlp.router."
            assert all(
                torch.equal(s[router + "expert_bias"], sd[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"])
                for s in shards
            )
            assert torch.equal(shards[-1][router + "weight"], sd[f"model.layers.{layer}.mlp.gate.weight"])


def test_an_hf_tensor_the_converter_does_not_know_is_refused() -> None:
    sd = dict(hm.build_hf_model(hm.DEEPSEEK_V3, seed=0).state_dict())
    sd["model.layers.2.self_attn.q_a_proj.bias"] = torch.zeros(32)
    with pytest.raises(KeyError, match=r"q_a_proj\.bias"):
        convert(hm.DEEPSEEK_V3, sd, 1, 0)


def test_layouts_that_do_not_split_are_refused() -> None:
    sd = hm.build_hf_model(hm.DEEPSEEK_V3, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"4 attention heads do not split over TP=8"):
        convert(hm.DEEPSEEK_V3, sd, 8, 0)
    with pytest.raises(ValueError, match=r"8 experts do not split over EP=3"):
        convert(hm.DEEPSEEK_V3, sd, 1, 0, ep_size=3, ep_rank=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_experts_per_tok": 4}, r"num_experts_per_tok 4 != 2 \* topk_group 1"),
        ({"norm_topk_prob": False}, r"norm_topk_prob=True"),
        ({"rope_interleave": False}, r"interleaved plain RoPE"),
        ({"rms_norm_eps": 1e-5}, r"rms_norm_eps=1e-6"),
    ],
)
def test_configs_megatron_would_compute_differently_are_refused(change: dict, message: str) -> None:
    case = dataclasses.replace(hm.DEEPSEEK_V3, hf_config={**hm.DEEPSEEK_V3.hf_config, **change})
    with pytest.raises(ValueError, match=message):
        megatron_mla.config_fields(case)
