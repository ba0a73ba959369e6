"""Megatron -> Hugging Face names: every table entry, routed experts in both namings, and the real HF models."""

from __future__ import annotations

import pytest
import torch

from refit.errors import LayoutError, ModelMismatchError
from refit.plan.naming import ARCHITECTURES, ExpertName, architecture_from_hf, expert_index, hf_names, parse_expert

L, HL = "decoder.layers.3.", "model.layers.3."


@pytest.mark.parametrize(
    ("megatron", "hf"),
    [
        ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        ("decoder.final_layernorm.weight", ("model.norm.weight",)),
        ("decoder.final_layernorm.bias", ("model.norm.bias",)),
        ("output_layer.weight", ("lm_head.weight",)),
        (L + "input_layernorm.weight", (HL + "input_layernorm.weight",)),
        (L + "input_layernorm.bias", (HL + "input_layernorm.bias",)),
        # Transformer-Engine fused norms live on the next linear layer.
        (L + "self_attention.linear_qkv.layer_norm_weight", (HL + "input_layernorm.weight",)),
        (L + "self_attention.linear_qkv.layer_norm_bias", (HL + "input_layernorm.bias",)),
        (
            L + "self_attention.linear_qkv.weight",
            (HL + "self_attn.q_proj.weight", HL + "self_attn.k_proj.weight", HL + "self_attn.v_proj.weight"),
        ),
        (
            L + "self_attention.linear_qkv.bias",
            (HL + "self_attn.q_proj.bias", HL + "self_attn.k_proj.bias", HL + "self_attn.v_proj.bias"),
        ),
        (L + "self_attention.q_layernorm.weight", (HL + "self_attn.q_norm.weight",)),
        (L + "self_attention.k_layernorm.weight", (HL + "self_attn.k_norm.weight",)),
        (L + "self_attention.linear_proj.weight", (HL + "self_attn.o_proj.weight",)),
        (L + "self_attention.linear_proj.bias", (HL + "self_attn.o_proj.bias",)),
        (L + "pre_mlp_layernorm.weight", (HL + "post_attention_layernorm.weight",)),
        (L + "mlp.linear_fc1.layer_norm_weight", (HL + "post_attention_layernorm.weight",)),
        (L + "mlp.linear_fc1.layer_norm_bias", (HL + "post_attention_layernorm.bias",)),
        (L + "mlp.linear_fc1.weight", (HL + "mlp.gate_proj.weight", HL + "mlp.up_proj.weight")),
        (L + "mlp.linear_fc1.bias", (HL + "mlp.gate_proj.bias", HL + "mlp.up_proj.bias")),
        (L + "mlp.linear_fc2.weight", (HL + "mlp.down_proj.weight",)),
        (L + "mlp.router.weight", (HL + "mlp.gate.weight",)),
        (L + "mlp.router.expert_bias", (HL + "mlp.gate.e_score_correction_bias",)),
        (
            L + "mlp.shared_experts.linear_fc1.weight",
            (HL + "mlp.shared_experts.gate_proj.weight", HL + "mlp.shared_experts.up_proj.weight"),
        ),
        (L + "mlp.shared_experts.linear_fc2.weight", (HL + "mlp.shared_experts.down_proj.weight",)),
        # Routed experts: TEGroupedMLP (index after the parameter) and SequentialMLP (local_experts.<e>).
        (
            L + "mlp.experts.linear_fc1.weight12",
            (HL + "mlp.experts.12.gate_proj.weight", HL + "mlp.experts.12.up_proj.weight"),
        ),
        (L + "mlp.experts.linear_fc2.weight0", (HL + "mlp.experts.0.down_proj.weight",)),
        (L + "mlp.experts.linear_fc2.bias7", (HL + "mlp.experts.7.down_proj.bias",)),
        (
            L + "mlp.experts.local_experts.5.linear_fc1.weight",
            (HL + "mlp.experts.5.gate_proj.weight", HL + "mlp.experts.5.up_proj.weight"),
        ),
        (L + "mlp.experts.local_experts.5.linear_fc2.weight", (HL + "mlp.experts.5.down_proj.weight",)),
    ],
)
def test_every_table_entry(megatron: str, hf: tuple[str, ...]) -> None:
    assert hf_names(megatron) == hf


@pytest.mark.parametrize(
    ("megatron", "hf"),
    [
        (L + "mlp.linear_fc1.weight", HL + "mlp.up_proj.weight"),
        (L + "mlp.shared_experts.linear_fc1.weight", HL + "mlp.shared_experts.up_proj.weight"),
        (L + "mlp.experts.linear_fc1.weight2", HL + "mlp.experts.2.up_proj.weight"),
        (L + "mlp.experts.local_experts.2.linear_fc1.bias", HL + "mlp.experts.2.up_proj.bias"),
    ],
)
def test_a_non_gated_fc1_is_its_up_projection(megatron: str, hf: str) -> None:
    assert hf_names(megatron, gated=False) == (hf,)


def test_non_gated_leaves_everything_but_fc1_alone() -> None:
    name = L + "self_attention.linear_qkv.weight"
    assert hf_names(name, gated=False) == hf_names(name)
    assert hf_names(L + "mlp.linear_fc2.weight", gated=False) == (HL + "mlp.down_proj.weight",)


@pytest.mark.parametrize(
    "megatron",
    [
        "embedding.position_embeddings.weight",
        L + "self_attention.linear_q_down_proj.weight",  # MLA: only the deepseek_v3 table names it
        L + "mlp.experts.linear_fc3.weight1",
        L + "mlp.experts.linear_fc1.weight",  # grouped form without an expert index
        "layers.3.mlp.linear_fc1.weight",
    ],
)
def test_names_without_a_hf_counterpart_are_refused(megatron: str) -> None:
    with pytest.raises(LayoutError, match="no Hugging Face name"):
        hf_names(megatron)


def test_expert_names_parse_in_both_namings() -> None:
    assert parse_expert(L + "mlp.experts.linear_fc1.weight17") == ExpertName(layer=3, expert=17, fc=1, param="weight")
    assert parse_expert(L + "mlp.experts.local_experts.5.linear_fc2.bias") == ExpertName(
        layer=3, expert=5, fc=2, param="bias"
    )
    assert parse_expert(L + "mlp.shared_experts.linear_fc1.weight") is None
    assert expert_index(L + "mlp.experts.linear_fc2.weight30") == 30
    with pytest.raises(ModelMismatchError, match="no expert index"):
        expert_index(L + "mlp.linear_fc1.weight")


def test_architectures_round_trip_and_unknown_ones_are_named() -> None:
    assert {architecture_from_hf(hf) for hf in ARCHITECTURES.values()} == set(ARCHITECTURES)
    assert architecture_from_hf("MistralForCausalLM") == "mistral"
    with pytest.raises(LayoutError, match="GPT2LMHeadModel"):
        architecture_from_hf("GPT2LMHeadModel")


def _megatron_names(arch: str, layers: int, *, fused_norms: bool) -> list[str]:
    """The parameters a Megatron GPTModel of `arch` publishes (local-spec or TE fused-norm names)."""
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    for i in range(layers):
        p = f"decoder.layers.{i}."
        names += [p + "self_attention.linear_qkv.weight", p + "self_attention.linear_proj.weight"]
        names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
        if fused_norms:
            names += [p + "self_attention.linear_qkv.layer_norm_weight", p + "mlp.linear_fc1.layer_norm_weight"]
        else:
            names += [p + "input_layernorm.weight", p + "pre_mlp_layernorm.weight"]
        if arch == "qwen2":
            names.append(p + "self_attention.linear_qkv.bias")
        if arch == "qwen3":
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
    return names


DENSE = sorted(a for a in ARCHITECTURES if a in ("llama", "mistral", "qwen2", "qwen3"))


@pytest.mark.parametrize("fused_norms", [False, True], ids=["local", "te"])
@pytest.mark.parametrize("arch", DENSE)
def test_names_are_exactly_the_hf_models_parameters(arch: str, fused_norms: bool) -> None:
    transformers = pytest.importorskip("transformers")
    hf_class = ARCHITECTURES[arch]
    config_class = getattr(transformers, hf_class.replace("ForCausalLM", "Config"))
    config = config_class(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):  # names only: no memory, no initialisation
        model = getattr(transformers, hf_class)(config)
    mapped = [n for m in _megatron_names(arch, 2, fused_norms=fused_norms) for n in hf_names(m)]
    assert len(mapped) == len(set(mapped))
    assert set(mapped) == set(model.state_dict())


def _moe_megatron_names(arch: str, *, grouped: bool) -> list[str]:
    """A 2-layer MoE model's parameters: layer 0 MoE (4 experts), layer 1 dense (`mlp_only_layers=[1]`)."""
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    for i in range(2):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm.weight", p + "pre_mlp_layernorm.weight"]
        names += [p + "self_attention.linear_qkv.weight", p + "self_attention.linear_proj.weight"]
        if arch == "qwen2_moe":
            names.append(p + "self_attention.linear_qkv.bias")
        else:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        if i == 1:
            names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
            continue
        names.append(p + "mlp.router.weight")
        for e in range(4):
            for fc in (1, 2):
                names.append(
                    f"{p}mlp.experts.linear_fc{fc}.weight{e}"
                    if grouped
                    else f"{p}mlp.experts.local_experts.{e}.linear_fc{fc}.weight"
                )
        if arch == "qwen2_moe":
            names += [p + "mlp.shared_experts.linear_fc1.weight", p + "mlp.shared_experts.linear_fc2.weight"]
            names.append(p + "mlp.shared_experts.gate_weight")
    return names


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_moe_names_are_exactly_the_checkpoints_tensors(arch: str, grouped: bool, tmp_path) -> None:
    """The names vLLM's loaders read: what transformers writes to a checkpoint (per-expert tensors)."""
    transformers = pytest.importorskip("transformers")
    safetensors = pytest.importorskip("safetensors")
    hf_class = ARCHITECTURES[arch]
    config = getattr(transformers, hf_class.replace("ForCausalLM", "Config"))(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[1], num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, tie_word_embeddings=False, shared_expert_intermediate_size=8,
    )  # fmt: skip
    getattr(transformers, hf_class)(config).save_pretrained(tmp_path)
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    mapped = [n for m in _moe_megatron_names(arch, grouped=grouped) for n in hf_names(m, architecture=arch)]
    assert len(mapped) == len(set(mapped))
    assert set(mapped) == stored


def test_shared_experts_are_named_per_architecture() -> None:
    fc1 = L + "mlp.shared_experts.linear_fc1.weight"
    assert hf_names(fc1, architecture="qwen2_moe") == (
        HL + "mlp.shared_expert.gate_proj.weight",
        HL + "mlp.shared_expert.up_proj.weight",
    )
    assert hf_names(fc1, architecture="deepseek_v3") == hf_names(fc1)  # DeepSeek's plural names
    assert hf_names(L + "mlp.shared_experts.gate_weight", architecture="qwen2_moe") == (
        HL + "mlp.shared_expert_gate.weight",
    )
    with pytest.raises(LayoutError, match="gate_weight"):
        hf_names(L + "mlp.shared_experts.gate_weight")  # no gated shared expert in DeepSeek's names
