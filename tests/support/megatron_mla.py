"""Megatron-Core (0.16.1 to 0.19.x) multi-latent attention (DeepSeek-V3 / Kimi-K2) on CPU, for the test trainers.

Owns what trainer_ops needs beyond a GQA model to build an MLA GPTModel from a `ModelCase`:
* `config_fields`: the `MLATransformerConfig` fields equivalent to HF's `DeepseekV3Config`;
* `fit_local_spec`: the local layer spec made buildable (a core attention that takes MLA's k / v sizes;
  from 0.19, no query norm without a query latent);
* `apply_cpu_workarounds`: the Transformer-Engine mock Megatron's MLA module sees without TE.
The library itself never patches Megatron; these are the test trainer's choices, stated in
docs/mla_conventions.md. megatron-core is imported lazily.
"""

from __future__ import annotations

from typing import Any

from refit_bench import mla_cpu
from tests.support.hf_models import ModelCase


def config_fields(case: ModelCase) -> dict[str, Any]:
    """The TransformerConfig fields that make Megatron's MLA and DeepSeek MoE compute what HF's do.

    * `qk_layernorm=True`: the local spec then builds real `q_layernorm` / `kv_layernorm` RMSNorms
      (identity otherwise), HF's `q_a_layernorm` / `kv_a_layernorm`. Megatron gives them
      `layernorm_epsilon`, HF its RMSNorm default 1e-6: equal only when `rms_norm_eps` is 1e-6.
    * Plain RoPE over the rope dims (`rope_type="rope"`, scaling factor 1: softmax scale
      1/sqrt(nope + rope) like HF); `kv_channels = v_head_dim` sizes the core attention's output.
    * Routing: sigmoid scores, `expert_bias` added for the choice only, top `topk_group` of `n_group`
      groups, renormalised (Megatron always renormalises sigmoid top-k: HF's `norm_topk_prob=True`),
      times `routed_scaling_factor`. Megatron scores a group by the sum of its top `topk / topk_group`
      scores, HF by its top 2: equal only when `num_experts_per_tok == 2 * topk_group` (DeepSeek-V3:
      8 = 2 * 4).
    * One ungated shared expert of `n_shared_experts * moe_intermediate_size`.
    * CPU: the `allgather` dispatcher and SequentialMLP experts, no aux loss, no bias updates (no grad).
    """
    cfg = case.hf_config
    topk, groups, group_topk = case.moe_topk, int(cfg["n_group"]), int(cfg["topk_group"])
    if topk != 2 * group_topk:
        raise ValueError(
            f"{case.id}: num_experts_per_tok {topk} != 2 * topk_group {group_topk}: Megatron and HF "
            "would score expert groups differently"
        )
    if not cfg.get("norm_topk_prob", True) or case.rms_norm_eps != 1e-6:
        raise ValueError(f"{case.id}: needs norm_topk_prob=True and rms_norm_eps=1e-6 to match Megatron")
    if not cfg.get("rope_interleave", True) or cfg.get("rope_scaling") or cfg.get("attention_bias"):
        raise ValueError(f"{case.id}: only interleaved plain RoPE without attention bias is mapped")
    return {
        "q_lora_rank": cfg.get("q_lora_rank"),
        "kv_lora_rank": int(cfg["kv_lora_rank"]),
        "qk_head_dim": int(cfg["qk_nope_head_dim"]),
        "qk_pos_emb_head_dim": int(cfg["qk_rope_head_dim"]),
        "v_head_dim": int(cfg["v_head_dim"]),
        "kv_channels": int(cfg["v_head_dim"]),
        "num_query_groups": case.num_heads,
        "qk_layernorm": True,
        "rope_type": "rope",
        "rotary_base": case.rope_theta,
        "rotary_scaling_factor": 1.0,
        "num_moe_experts": case.num_experts,
        "moe_ffn_hidden_size": case.moe_ffn_hidden_size,
        "moe_layer_freq": [int(m) for m in case.moe_layers],
        "moe_router_topk": topk,
        "moe_router_num_groups": groups,
        "moe_router_group_topk": group_topk,
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": float(cfg["routed_scaling_factor"]),
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_token_dispatcher_type": "allgather",
        "moe_grouped_gemm": False,
        "moe_shared_expert_intermediate_size": int(cfg["n_shared_experts"]) * case.moe_ffn_hidden_size,
    }


def config_class() -> type:
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig


def fit_local_spec(block_spec: Any) -> Any:
    """Put the MLA-aware core attention (and, from 0.19, self-attention) into every layer spec of a
    local-spec decoder block (in place)."""
    # The bench builds the same CPU MLA models: one home for the two classes (tests may import bench).
    core = mla_cpu.mla_core_attention()
    attention = mla_cpu.mla_self_attention()
    for layer_spec in block_spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = core
        if attention is not None:
            layer_spec.submodules.self_attention.module = attention
    return block_spec


def apply_cpu_workarounds() -> None:
    """Without Transformer Engine, `megatron.core.extensions.transformer_engine` still imports (with
    `MagicMock` stand-ins), so `multi_latent_attention.HAVE_TE` is True and
    `isinstance(self.linear_proj, TELinear)` fails ("arg 2 must be a type"). The module has no TE:
    say so. Process-wide, idempotent."""
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False
