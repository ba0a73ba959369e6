"""Megatron-Core parameter names and their Hugging Face counterparts, per architecture.

Llama, Mistral, Qwen2 and Qwen3 share one table (their HF checkpoints name every tensor alike):
Qwen2 adds q/k/v biases and Qwen3 adds q/k norms, which follow from the model's own tensors rather
than from separate tables. Both the local-spec names and the Transformer-Engine fused-norm names
(`linear_qkv.layer_norm_weight`) are understood.

MoE models (Qwen3-MoE, Mixtral, Qwen2-MoE, and DeepSeek-V3's names for the planner) add the router
(`mlp.router.weight` -> `mlp.gate.weight`), routed experts and shared experts. A routed expert is one
tensor per expert in Megatron, in either naming (SequentialMLP `mlp.experts.local_experts.{e}.linear_fc1`
or TEGroupedMLP `mlp.experts.linear_fc1.weight{e}`, `e` always the *global* expert id), and maps to the
per-expert checkpoint names `model.layers.L.mlp.experts.{e}.{gate,up,down}_proj.weight` that vLLM's
loaders take; `HFEngine` installs them into slices of transformers 5.x's fused expert parameters.
Mixtral uses the same names (transformers keeps it under `mlp.` in memory; its checkpoints' and vLLM's
`block_sparse_moe.experts.{e}.w1/w3/w2` are a rename an engine makes itself). Shared experts are named
per architecture: Qwen2-MoE's single `mlp.shared_expert.*` with its `mlp.shared_expert_gate`, and
DeepSeek's `mlp.shared_experts.*` for every other architecture.

DeepSeek-V3 (and Kimi-K2, its architecture) adds multi-latent attention: Megatron's
`linear_q_down_proj` / `q_layernorm` / `linear_q_up_proj` (or `linear_q_proj` without a query
latent), `linear_kv_down_proj` / `kv_layernorm` / `linear_kv_up_proj` and `linear_proj` are HF's
`q_a_proj` / `q_a_layernorm` / `q_b_proj` (`q_proj`), `kv_a_proj_with_mqa` / `kv_a_layernorm` /
`kv_b_proj` and `o_proj`, identical tensors (docs/mla_conventions.md). Its router bias buffer
`mlp.router.expert_bias` is HF's `mlp.gate.e_score_correction_bias`. Multi-token prediction layers
(`mtp.*`) have no HF name: out of scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from refit.errors import LayoutError, ModelMismatchError

# refit architecture id -> Hugging Face `architectures[0]`
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
_HF_TO_ARCH = {hf: arch for arch, hf in ARCHITECTURES.items()}


def architecture_from_hf(hf_architecture: str) -> str:
    """Map an HF class name (`Qwen2ForCausalLM`) to refit's id (`qwen2`)."""
    try:
        return _HF_TO_ARCH[hf_architecture]
    except KeyError:
        raise LayoutError(f"unsupported architecture {hf_architecture!r}; supported: {sorted(_HF_TO_ARCH)}") from None


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Per-layer suffix -> HF suffix(es). `{p}` is the parameter kind (weight / bias). Three names are
# q, k and v of the fused QKV; two names are the gate and up halves of a gated fc1.
_LAYER_TABLE: dict[str, tuple[str, ...]] = {
    "input_layernorm.{p}": ("input_layernorm.{p}",),
    "self_attention.linear_qkv.layer_norm_{p}": ("input_layernorm.{p}",),
    "self_attention.linear_qkv.{p}": ("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"),
    "self_attention.q_layernorm.{p}": ("self_attn.q_norm.{p}",),
    "self_attention.k_layernorm.{p}": ("self_attn.k_norm.{p}",),
    "self_attention.linear_proj.{p}": ("self_attn.o_proj.{p}",),
    "pre_mlp_layernorm.{p}": ("post_attention_layernorm.{p}",),
    "mlp.linear_fc1.layer_norm_{p}": ("post_attention_layernorm.{p}",),
    "mlp.linear_fc1.{p}": ("mlp.gate_proj.{p}", "mlp.up_proj.{p}"),
    "mlp.linear_fc2.{p}": ("mlp.down_proj.{p}",),
    # MoE: the router and its bias (DeepSeek-V3's name), and DeepSeek's shared experts.
    "mlp.router.{p}": ("mlp.gate.{p}",),
    "mlp.router.expert_bias": ("mlp.gate.e_score_correction_bias",),
    "mlp.shared_experts.linear_fc1.{p}": ("mlp.shared_experts.gate_proj.{p}", "mlp.shared_experts.up_proj.{p}"),
    "mlp.shared_experts.linear_fc2.{p}": ("mlp.shared_experts.down_proj.{p}",),
}
# Entries an architecture names its own way (they replace the shared table's).
_ARCH_LAYER_TABLES: dict[str, dict[str, tuple[str, ...]]] = {
    # Qwen2-MoE: one shared expert, scaled by sigmoid(shared_expert_gate(x)) like Megatron's gate_weight.
    "qwen2_moe": {
        "mlp.shared_experts.linear_fc1.{p}": ("mlp.shared_expert.gate_proj.{p}", "mlp.shared_expert.up_proj.{p}"),
        "mlp.shared_experts.linear_fc2.{p}": ("mlp.shared_expert.down_proj.{p}",),
        "mlp.shared_experts.gate_weight": ("mlp.shared_expert_gate.weight",),
    },
    # DeepSeek-V3 / Kimi-K2: multi-latent attention, every tensor mapped whole (docs/mla_conventions.md).
    # The latent norms are `q_layernorm` / `kv_layernorm` in the local spec and fused into the up
    # projections (`layer_norm_weight`) in the Transformer-Engine spec.
    "deepseek_v3": {
        "self_attention.linear_q_proj.{p}": ("self_attn.q_proj.{p}",),
        "self_attention.linear_q_down_proj.{p}": ("self_attn.q_a_proj.{p}",),
        "self_attention.q_layernorm.{p}": ("self_attn.q_a_layernorm.{p}",),
        "self_attention.linear_q_up_proj.layer_norm_{p}": ("self_attn.q_a_layernorm.{p}",),
        "self_attention.linear_q_up_proj.{p}": ("self_attn.q_b_proj.{p}",),
        "self_attention.linear_kv_down_proj.{p}": ("self_attn.kv_a_proj_with_mqa.{p}",),
        "self_attention.kv_layernorm.{p}": ("self_attn.kv_a_layernorm.{p}",),
        "self_attention.linear_kv_up_proj.layer_norm_{p}": ("self_attn.kv_a_layernorm.{p}",),
        "self_attention.linear_kv_up_proj.{p}": ("self_attn.kv_b_proj.{p}",),
    },
}
# HF names of MLA's down projections: whole on every rank of an HF-convention engine (vLLM replicates
# q_a_proj and kv_a_proj_with_mqa), however the trainer splits them.
MLA_DOWN_PROJECTIONS = ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight")
_TOP_TABLE: dict[str, tuple[str, ...]] = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight",),
    "decoder.final_layernorm.weight": ("model.norm.weight",),
    "decoder.final_layernorm.bias": ("model.norm.bias",),
    "output_layer.weight": ("lm_head.weight",),
}


def _expand(table: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {
        key.format(p=p): tuple(n.format(p=p) for n in names) for key, names in table.items() for p in ("weight", "bias")
    }


_LAYER_MAP = _expand(_LAYER_TABLE)
_ARCH_LAYER_MAPS = {arch: _LAYER_MAP | _expand(table) for arch, table in _ARCH_LAYER_TABLES.items()}

# A routed expert, one global tensor per expert, in the TEGroupedMLP form (`experts.linear_fc1.weight7`)
# or the SequentialMLP form (`experts.local_experts.7.linear_fc1.weight`).
_EXPERT = re.compile(
    r"^decoder\.layers\.(?P<layer>\d+)\.mlp\.experts\."
    r"(?:local_experts\.(?P<e1>\d+)\.linear_fc(?P<fc1>[12])\.(?P<p1>weight|bias)"
    r"|linear_fc(?P<fc2>[12])\.(?P<p2>weight|bias)(?P<e2>\d+))$"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertName:
    """The parts of a routed expert's Megatron name."""

    layer: int
    expert: int  # global expert index
    fc: int  # 1: linear_fc1 (gate/up), 2: linear_fc2 (down)
    param: str  # "weight" or "bias"


def parse_expert(megatron_name: str) -> ExpertName | None:
    """The parts of a routed expert's Megatron name, or None for any other name."""
    m = _EXPERT.match(megatron_name)
    if m is None:
        return None
    return ExpertName(
        layer=int(m["layer"]),
        expert=int(m["e1"] or m["e2"]),
        fc=int(m["fc1"] or m["fc2"]),
        param=m["p1"] or m["p2"],
    )


def expert_index(megatron_name: str) -> int:
    """The global expert index in a routed expert's Megatron name; ModelMismatchError if it has none."""
    expert = parse_expert(megatron_name)
    if expert is None:
        raise ModelMismatchError(f"{megatron_name}: an expert role, but no expert index in the name")
    return expert.expert


def hf_names(megatron_name: str, *, gated: bool = True, architecture: str = "") -> tuple[str, ...]:
    """The HF name(s) of a global Megatron parameter name; LayoutError if it has none.

    One name, `(q, k, v)` for a fused QKV, or `(gate, up)` for a gated fc1. With `gated=False` a
    fc1 maps to its single up projection. `architecture` (refit's id) picks the names an
    architecture spells its own way (Qwen2-MoE's shared expert); any other, or none, gets the shared table.
    """
    if megatron_name in _TOP_TABLE:
        return _TOP_TABLE[megatron_name]
    expert = parse_expert(megatron_name)
    if expert is not None:
        prefix = f"model.layers.{expert.layer}.mlp.experts.{expert.expert}."
        names = ("gate_proj", "up_proj") if expert.fc == 1 else ("down_proj",)
        names = tuple(f"{prefix}{n}.{expert.param}" for n in names)
    else:
        m = _LAYER.match(megatron_name)
        table = _ARCH_LAYER_MAPS.get(architecture, _LAYER_MAP)
        if m is None or m.group(2) not in table:
            raise LayoutError(f"no Hugging Face name for Megatron parameter {megatron_name!r}")
        names = tuple(f"model.layers.{m.group(1)}.{n}" for n in table[m.group(2)])
    if len(names) == 2 and not gated:  # a non-gated MLP has a single up projection
        return names[1:]
    return names
