"""The global Megatron tensors of a Llama / Qwen2 / Qwen3 model, or of a Qwen3-MoE / Mixtral / Qwen2-MoE /
DeepSeek-V3 (multi-latent attention) model, from its dimensions alone (and, for MoE, which layers are sparse).

An engine that knows its model only from a config (vLLM) asks the planner for its expected tensors
the same way a receiver plans a pull: these descriptors through `targets_for` at the engine's
layout. So the engine's shapes and the pulled shapes come from one rule and cannot disagree.

Names are Megatron-Core's local-spec names (`input_layernorm`, `pre_mlp_layernorm`); the fused-norm
names of the Transformer-Engine spec map to the same Hugging Face tensors. Every descriptor is the
whole tensor (a replicated shard, rank 0 of 1): `targets_for` reads only role, dtype and global shape.
"""

from __future__ import annotations

import dataclasses
import re

from refit.errors import LayoutError, ModelMismatchError
from refit.plan.targets import EngineLayout, Target, targets_for
from refit.types import ModelMeta, Role, TensorDesc


def dense_tensors(model: ModelMeta) -> list[TensorDesc]:
    """Every parameter of a dense GPT model as Megatron-Core holds it, in model order.

    `model.padded_vocab_size` sets the vocabulary tables' rows; `qkv_bias` adds the fused QKV bias
    (Qwen2), `qk_layernorm` the per-head q/k norms (Qwen3), `tied_embeddings` drops the output layer,
    `gated_linear_unit` makes fc1 `[gate; up]`.
    """
    if model.num_experts:
        raise LayoutError(
            f"{model.architecture}: {model.num_experts} experts; only dense models have fixed shapes here"
        )
    h, d, f = model.hidden_size, model.kv_channels, model.ffn_hidden_size
    qkv = (model.num_attention_heads + 2 * model.num_query_groups) * d
    shapes: list[tuple[str, Role, tuple[int, ...]]] = [
        ("embedding.word_embeddings.weight", Role.VOCAB_PARALLEL, (model.padded_vocab_size, h))
    ]
    for i in range(model.num_layers):
        p = f"decoder.layers.{i}."
        shapes.append((p + "input_layernorm.weight", Role.REPLICATED, (h,)))
        if model.multi_latent_attention:
            shapes += _mla_attention(model, p)
        else:
            shapes.append((p + "self_attention.linear_qkv.weight", Role.QKV_COLUMN, (qkv, h)))
        if model.qkv_bias and not model.multi_latent_attention:
            shapes.append((p + "self_attention.linear_qkv.bias", Role.QKV_COLUMN, (qkv,)))
        if model.qk_layernorm and not model.multi_latent_attention:
            shapes += [
                (p + "self_attention.q_layernorm.weight", Role.REPLICATED, (d,)),
                (p + "self_attention.k_layernorm.weight", Role.REPLICATED, (d,)),
            ]
        fc1 = (Role.GATED_MLP_COLUMN, (2 * f, h)) if model.gated_linear_unit else (Role.COLUMN, (f, h))
        shapes += [
            (p + "self_attention.linear_proj.weight", Role.ROW, (h, model.num_attention_heads * d)),
            (p + "pre_mlp_layernorm.weight", Role.REPLICATED, (h,)),
            (p + "mlp.linear_fc1.weight", *fc1),
            (p + "mlp.linear_fc2.weight", Role.ROW, (h, f)),
        ]
    shapes.append(("decoder.final_layernorm.weight", Role.REPLICATED, (h,)))
    if not model.tied_embeddings:
        shapes.append(("output_layer.weight", Role.VOCAB_PARALLEL, (model.padded_vocab_size, h)))
    return [
        TensorDesc.shard(name=name, role=role, dtype=model.params_dtype, global_shape=shape, rank=0, size=1)
        for name, role, shape in shapes
    ]


def _mla_attention(model: ModelMeta, p: str) -> list[tuple[str, Role, tuple[int, ...]]]:
    """Multi-latent attention's tensors but `linear_proj` (local spec: real latent norms; every
    projection column-parallel, the down projections included)."""
    h, nh, rope = model.hidden_size, model.num_attention_heads, model.qk_rope_head_dim
    q_rows = nh * (model.qk_nope_head_dim + rope)
    a = p + "self_attention."
    if model.q_lora_rank:
        q = [
            (a + "linear_q_down_proj.weight", Role.COLUMN, (model.q_lora_rank, h)),
            (a + "q_layernorm.weight", Role.REPLICATED, (model.q_lora_rank,)),
            (a + "linear_q_up_proj.weight", Role.COLUMN, (q_rows, model.q_lora_rank)),
        ]
    else:
        q = [(a + "linear_q_proj.weight", Role.COLUMN, (q_rows, h))]
    kv = model.kv_lora_rank
    return [
        *q,
        (a + "linear_kv_down_proj.weight", Role.COLUMN, (kv + rope, h)),
        (a + "kv_layernorm.weight", Role.REPLICATED, (kv,)),
        (a + "linear_kv_up_proj.weight", Role.COLUMN, (nh * (model.qk_nope_head_dim + model.v_head_dim), kv)),
    ]


def model_tensors(model: ModelMeta, moe_layers: frozenset[int] = frozenset(), shared: int = 0) -> list[TensorDesc]:
    """The global Megatron tensors of a dense or MoE model: `dense_tensors`, with MoE blocks in `moe_layers`.

    Which layers are MoE is not part of `ModelMeta` (Megatron's `moe_layer_freq`, HF's
    `mlp_only_layers` / `decoder_sparse_step`): the engine says, from the model it built.

    A MoE layer's dense MLP is replaced by its router `[E, H]`, each routed expert's fc1 `[2F, H]` (gate;
    up) and fc2 `[H, F]` under its global id, and (Qwen2-MoE) a shared expert of FFN `shared` with its gate.
    DeepSeek-V3 (MLA): the router's fp32 `expert_bias` `[E]` too, and ungated shared experts of FFN `shared`.
    """
    if not model.num_experts:
        return dense_tensors(model)
    if model.architecture not in ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"):
        raise ModelMismatchError(f"{model.architecture}: MoE models of this architecture are not supported here")
    if shared and model.architecture not in ("qwen2_moe", "deepseek_v3"):
        raise ModelMismatchError(f"{model.architecture}: shared experts are supported for qwen2_moe and deepseek_v3")
    deepseek = model.architecture == "deepseek_v3"
    h, f, dtype = model.hidden_size, model.moe_ffn_hidden_size, model.params_dtype
    out: list[TensorDesc] = []
    for desc in dense_tensors(dataclasses.replace(model, num_experts=0, moe_ffn_hidden_size=0)):
        m = re.match(r"^decoder\.layers\.(\d+)\.mlp\.linear_fc([12])\.weight$", desc.name)
        if m is None or int(m[1]) not in moe_layers:
            out.append(desc)
            continue
        if m[2] == "2":
            continue
        p = f"decoder.layers.{m[1]}.mlp."
        shapes: list[tuple[str, Role, tuple[int, ...]]] = [
            (p + "router.weight", Role.REPLICATED, (model.num_experts, h))
        ]
        if deepseek:  # the router's score-correction bias, an fp32 buffer in any params dtype
            out.append(TensorDesc.shard(name=p + "router.expert_bias", role=Role.REPLICATED, dtype="float32",
                                        global_shape=(model.num_experts,)))  # fmt: skip
        fc1 = (Role.EXPERT_GATED_COLUMN, (2 * f, h)) if model.gated_linear_unit else (Role.EXPERT_COLUMN, (f, h))
        for e in range(model.num_experts):
            shapes += [
                (f"{p}experts.local_experts.{e}.linear_fc1.weight", *fc1),
                (f"{p}experts.local_experts.{e}.linear_fc2.weight", Role.EXPERT_ROW, (h, f)),
            ]
        if shared:
            shapes += [
                (p + "shared_experts.linear_fc1.weight", Role.GATED_MLP_COLUMN, (2 * shared, h)),
                (p + "shared_experts.linear_fc2.weight", Role.ROW, (h, shared)),
            ]
            if not deepseek:  # DeepSeek's shared experts are ungated
                shapes.append((p + "shared_experts.gate_weight", Role.REPLICATED, (1, h)))
        out += [TensorDesc.shard(name=n, role=r, dtype=dtype, global_shape=s, rank=0, size=1) for n, r, s in shapes]
    return out


def dense_targets(model: ModelMeta, layout: EngineLayout) -> dict[str, Target]:
    """The targets an engine rank at `layout` holds of a dense model, by target name."""
    out: dict[str, Target] = {}
    for desc in dense_tensors(model):
        for target in targets_for(model, desc, layout):
            out[target.hf_name] = target
    return out
