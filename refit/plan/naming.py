"""Megatron-Core parameter names and their Hugging Face counterparts, per architecture.

Llama, Qwen2 and Qwen3 share one table: Qwen2 adds q/k/v biases, Qwen3 adds q/k norms, and both
follow from the model metadata rather than from separate tables. Both the local-spec names and the
Transformer-Engine fused-norm names are understood.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from refit.errors import LayoutError

# refit architecture id -> Hugging Face `architectures[0]`
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
_HF_TO_ARCH = {hf: arch for arch, hf in ARCHITECTURES.items()}


def architecture_from_hf(hf_architecture: str) -> str:
    """Map an HF class name (`Qwen2ForCausalLM`) to refit's id (`qwen2`)."""
    try:
        return _HF_TO_ARCH[hf_architecture]
    except KeyError:
        raise LayoutError(f"unsupported architecture {hf_architecture!r}; supported: {sorted(_HF_TO_ARCH)}") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class HFName:
    """Where one Megatron parameter goes: a single HF name, or the q/k/v or gate/up family."""

    kind: str  # "single", "qkv" or "gated"
    names: tuple[str, ...]  # one name, (q, k, v) or (gate, up)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Per-layer suffix -> (kind, HF suffix template). `{p}` is the parameter kind (weight / bias).
_LAYER_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.{p}": ("single", ("input_layernorm.{p}",)),
    "self_attention.linear_qkv.layer_norm_{p}": ("single", ("input_layernorm.{p}",)),
    "self_attention.linear_qkv.{p}": (
        "qkv",
        ("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"),
    ),
    "self_attention.q_layernorm.{p}": ("single", ("self_attn.q_norm.{p}",)),
    "self_attention.k_layernorm.{p}": ("single", ("self_attn.k_norm.{p}",)),
    "self_attention.linear_proj.{p}": ("single", ("self_attn.o_proj.{p}",)),
    "pre_mlp_layernorm.{p}": ("single", ("post_attention_layernorm.{p}",)),
    "mlp.linear_fc1.layer_norm_{p}": ("single", ("post_attention_layernorm.{p}",)),
    "mlp.linear_fc1.{p}": ("gated", ("mlp.gate_proj.{p}", "mlp.up_proj.{p}")),
    "mlp.linear_fc2.{p}": ("single", ("mlp.down_proj.{p}",)),
    # MoE (DeepSeek-V3 / Qwen3-MoE names): router, its bias, shared experts.
    "mlp.router.{p}": ("single", ("mlp.gate.{p}",)),
    "mlp.router.expert_bias": ("single", ("mlp.gate.e_score_correction_bias",)),
    "mlp.shared_experts.linear_fc1.{p}": (
        "gated",
        ("mlp.shared_experts.gate_proj.{p}", "mlp.shared_experts.up_proj.{p}"),
    ),
    "mlp.shared_experts.linear_fc2.{p}": ("single", ("mlp.shared_experts.down_proj.{p}",)),
}
# Routed experts, one global tensor per expert: TEGroupedMLP (`linear_fc1.weight7`) or SequentialMLP names.
_EXPERT = re.compile(
    r"^mlp\.experts\.(?:local_experts\.(\d+)\.linear_fc([12])\.(weight|bias)|linear_fc([12])\.(weight|bias)(\d+))$"
)
_TOP_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "embedding.word_embeddings.weight": ("single", ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": ("single", ("model.norm.weight",)),
    "decoder.final_layernorm.bias": ("single", ("model.norm.bias",)),
    "output_layer.weight": ("single", ("lm_head.weight",)),
}


def _expand(table: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, tuple[str, tuple[str, ...]]]:
    out = {}
    for key, (kind, names) in table.items():
        for p in ("weight", "bias"):
            out[key.format(p=p)] = (kind, tuple(n.format(p=p) for n in names))
    return out


_LAYER_MAP = _expand(_LAYER_TABLE)


def hf_names(megatron_name: str, *, gated: bool = True) -> HFName:
    """The HF name(s) of a global Megatron parameter name; LayoutError if it has none."""
    if megatron_name in _TOP_TABLE:
        kind, names = _TOP_TABLE[megatron_name]
        return HFName(kind=kind, names=names)
    m = _LAYER.match(megatron_name)
    expert = _EXPERT.match(m.group(2)) if m is not None else None
    if m is not None and expert is not None:
        e, fc, p = (
            expert.group(1) or expert.group(6),
            expert.group(2) or expert.group(4),
            expert.group(3) or expert.group(5),
        )
        kind, names = ("gated", ("gate_proj", "up_proj")) if fc == "1" else ("single", ("down_proj",))
        if kind == "gated" and not gated:
            kind, names = "single", ("up_proj",)
        prefix = f"model.layers.{m.group(1)}.mlp.experts.{e}."
        return HFName(kind=kind, names=tuple(f"{prefix}{n}.{p}" for n in names))
    if m is not None and m.group(2) in _LAYER_MAP:
        kind, names = _LAYER_MAP[m.group(2)]
        if kind == "gated" and not gated:
            # A non-gated MLP has a single up projection.
            kind, names = "single", (names[1],)
        prefix = f"model.layers.{m.group(1)}."
        return HFName(kind=kind, names=tuple(prefix + n for n in names))
    raise LayoutError(f"no Hugging Face name for Megatron parameter {megatron_name!r}")


def layer_of(megatron_name: str) -> int | None:
    """The global layer number in a Megatron name, or None for non-layer parameters."""
    m = _LAYER.match(megatron_name)
    return int(m.group(1)) if m else None
