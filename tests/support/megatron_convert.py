"""Independent HF -> Megatron-Core converter used as ground truth (pure torch, no `refit` imports).

Owns the per-rank *local* state dict a Megatron-Core 0.16.1 GPTModel chunk built with the local
(non-Transformer-Engine) layer spec holds for a Llama / Qwen2 / Qwen3 HF checkpoint:

* fused QKV: interleaved per query group `[q heads of group g | k_g | v_g]`, then cut into TP equal
  contiguous row blocks (also when `num_query_groups < TP`, where a rank holds part of a group);
  the qkv bias follows the same rule;
* gated fc1: each rank holds `[gate_r ; up_r]` (its TP slice of gate, then of up);
* row-parallel `linear_proj` / `linear_fc2`: split on dim 1;
* word embeddings / output layer: zero-padded to the padded vocab, then split by rows;
* norms (incl. Qwen3 q/k norms): replicated;
* MoE layers (Qwen3-MoE, Mixtral, Qwen2-MoE; transformers 5.x keeps routed experts fused as
  `mlp.experts.gate_up_proj` `[E, 2F, H]` (gate rows first) and `mlp.experts.down_proj` `[E, H, F]`):
  the router `mlp.gate.weight` -> `mlp.router.weight`, replicated; expert parallel rank `ep` holds the
  contiguous block of global experts `ep * E/EP + j` as `mlp.experts.local_experts.{j}` (SequentialMLP),
  each split over *expert* tensor parallelism (ETP, independent of TP): fc1 `[gate_r ; up_r]`, fc2 on
  dim 1; Qwen2-MoE's shared expert -> `mlp.shared_experts.linear_fc1/fc2` split over TP like a dense
  MLP, its `shared_expert_gate.weight` -> `mlp.shared_experts.gate_weight`, replicated.

Layout source: NVIDIA/Megatron-LM at tag `core_v0.16.1`, `megatron/core/`: `transformer/attention.py`
(`SelfAttention.get_query_key_value_tensors`: the per-group QKV split, and the all-gather when
`num_query_groups < TP`), `transformer/mlp.py` (`MLP.__init__`: fc1 with `stride=2`; `glu`: gate first),
`tensor_parallel/layers.py` (`ColumnParallelLinear` / `RowParallelLinear` partition dims and
`_initialize_affine_weight_cpu`'s strided split), `tensor_parallel/utils.py` (`VocabUtility`: vocab rows
per rank), `models/gpt/gpt_layer_specs.py` (`get_gpt_layer_local_spec`: the parameter names),
`transformer/moe/moe_layer.py` (`MoELayer.local_expert_indices`: `ep_rank * num_local_experts + j`),
`transformer/moe/experts.py` (`SequentialMLP`: one expert MLP per local expert, built with the expert
tensor parallel group), `transformer/moe/shared_experts.py` (`SharedExpertMLP`: a TP-split MLP plus the
`gate_weight` `[1, H]` applied as `sigmoid(x @ gate_weight.T)`) and `transformer/moe/router.py`
(`TopKRouter.weight` `[E, H]`) and HF's `modeling_qwen3_moe.py` / `modeling_mixtral.py` /
`modeling_qwen2_moe.py` (transformers 5.x: `gate_up_proj[e].chunk(2)` is gate, up). The
same conventions as refit itself sees them: the role table in docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

_HF_LAYER = "model.layers.{}."


def _shape_params(case_or_config: Any) -> tuple[int, int, int, bool]:
    """(heads, query groups, head dim, tied) from a ModelCase, an HF config dict or object."""
    cfg = getattr(case_or_config, "hf_config", case_or_config)
    if not isinstance(cfg, Mapping):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)  # a transformers config object
    heads = int(cfg["num_attention_heads"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    return heads, groups, head_dim, bool(cfg.get("tie_word_embeddings", False))


def _tp_chunk(tensor: torch.Tensor, tp_size: int, tp_rank: int, dim: int) -> torch.Tensor:
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"dim {dim} of shape {tuple(tensor.shape)} is not divisible by TP={tp_size}")
    return tensor.chunk(tp_size, dim=dim)[tp_rank].clone()


def interleave_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int, groups: int, head_dim: int
) -> torch.Tensor:
    """Global fused QKV `[(heads + 2*groups) * head_dim, ...]` from HF q/k/v (weights or biases)."""
    per_group = heads // groups
    trailing = q.shape[1:]
    qg = q.reshape(groups, per_group, head_dim, *trailing)
    kg = k.reshape(groups, 1, head_dim, *trailing)
    vg = v.reshape(groups, 1, head_dim, *trailing)
    return torch.cat([qg, kg, vg], dim=1).reshape((heads + 2 * groups) * head_dim, *trailing)


def _vocab_rows(table: torch.Tensor, padded_vocab: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    vocab = table.shape[0]
    if padded_vocab < vocab:
        raise ValueError(f"padded_vocab {padded_vocab} < vocab {vocab}")
    padded = torch.zeros((padded_vocab, *table.shape[1:]), dtype=table.dtype)
    padded[:vocab] = table
    return _tp_chunk(padded, tp_size, tp_rank, 0)


def _gated_mlp(take: Any, src: str, dst: str, size: int, rank: int) -> dict[str, torch.Tensor]:
    """HF `{src}gate_proj/up_proj/down_proj` -> Megatron `{dst}linear_fc1` `[gate_r ; up_r]` and `linear_fc2`."""
    gate = _tp_chunk(take(src + "gate_proj.weight"), size, rank, 0)
    up = _tp_chunk(take(src + "up_proj.weight"), size, rank, 0)
    return {
        dst + "linear_fc1.weight": torch.cat([gate, up], dim=0),
        dst + "linear_fc2.weight": _tp_chunk(take(src + "down_proj.weight"), size, rank, 1),
    }


def _moe_mlp(
    take: Any,
    hf_sd: Mapping[str, torch.Tensor],
    src: str,
    dst: str,
    tp_size: int,
    tp_rank: int,
    ep_size: int,
    ep_rank: int,
    etp_size: int,
    etp_rank: int,
) -> dict[str, torch.Tensor]:
    out = {dst + "mlp.router.weight": take("mlp.gate.weight").clone()}
    gate_up, down = take("mlp.experts.gate_up_proj"), take("mlp.experts.down_proj")
    experts, ffn = gate_up.shape[0], gate_up.shape[1] // 2
    if experts % ep_size:
        raise ValueError(f"{src}: {experts} experts do not split over EP={ep_size}")
    per_rank = experts // ep_size
    for j in range(per_rank):
        expert = ep_rank * per_rank + j
        gate = _tp_chunk(gate_up[expert, :ffn], etp_size, etp_rank, 0)
        up = _tp_chunk(gate_up[expert, ffn:], etp_size, etp_rank, 0)
        local = dst + f"mlp.experts.local_experts.{j}."
        out[local + "linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[local + "linear_fc2.weight"] = _tp_chunk(down[expert], etp_size, etp_rank, 1)
    if src + "mlp.shared_expert.gate_proj.weight" in hf_sd:
        out.update(_gated_mlp(take, "mlp.shared_expert.", dst + "mlp.shared_experts.", tp_size, tp_rank))
    if src + "mlp.shared_expert_gate.weight" in hf_sd:
        out[dst + "mlp.shared_experts.gate_weight"] = take("mlp.shared_expert_gate.weight").clone()
    return out


def hf_to_megatron_local(
    hf_sd: Mapping[str, torch.Tensor],
    case_or_config: Any,
    *,
    tp_size: int,
    tp_rank: int,
    layers: Sequence[int],
    pre_process: bool,
    post_process: bool,
    padded_vocab: int,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int | None = None,
    etp_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """The local Megatron state dict of one (TP, EP, ETP) rank of one model chunk.

    `layers` are the global layer ids the chunk holds, in order: HF `model.layers.{layers[i]}`
    becomes local `decoder.layers.{i}`. `pre_process` adds the word embeddings, `post_process` the
    final norm and (untied only) `output_layer.weight`. Qwen2 qkv biases and Qwen3 q/k norms are
    emitted when the HF state dict has them. A layer whose HF tensors include fused experts
    (`mlp.experts.gate_up_proj`) is converted as a MoE layer for expert parallel rank `ep_rank` of
    `ep_size` and expert tensor parallel rank `etp_rank` of `etp_size` (None: TP, Megatron's default);
    other layers ignore the expert arguments. Every HF tensor of the selected layers is consumed;
    an unknown one raises, so a new HF tensor cannot be silently dropped.
    """
    heads, groups, head_dim, tied = _shape_params(case_or_config)
    etp_size = tp_size if etp_size is None else etp_size
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside TP={tp_size}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank {ep_rank} outside EP={ep_size}")
    if not 0 <= etp_rank < etp_size:
        raise ValueError(f"etp_rank {etp_rank} outside ETP={etp_size}")
    out: dict[str, torch.Tensor] = {}
    for local, layer in enumerate(layers):
        src, dst = _HF_LAYER.format(layer), f"decoder.layers.{local}."
        used = set()

        def take(name: str, *, _src: str = src, _used: set[str] = used) -> torch.Tensor:
            _used.add(_src + name)
            return hf_sd[_src + name]

        out[dst + "input_layernorm.weight"] = take("input_layernorm.weight").clone()
        qkv = interleave_qkv(
            take("self_attn.q_proj.weight"),
            take("self_attn.k_proj.weight"),
            take("self_attn.v_proj.weight"),
            heads=heads,
            groups=groups,
            head_dim=head_dim,
        )
        out[dst + "self_attention.linear_qkv.weight"] = _tp_chunk(qkv, tp_size, tp_rank, 0)
        if src + "self_attn.q_proj.bias" in hf_sd:
            bias = interleave_qkv(
                take("self_attn.q_proj.bias"),
                take("self_attn.k_proj.bias"),
                take("self_attn.v_proj.bias"),
                heads=heads,
                groups=groups,
                head_dim=head_dim,
            )
            out[dst + "self_attention.linear_qkv.bias"] = _tp_chunk(bias, tp_size, tp_rank, 0)
        if src + "self_attn.q_norm.weight" in hf_sd:
            out[dst + "self_attention.q_layernorm.weight"] = take("self_attn.q_norm.weight").clone()
            out[dst + "self_attention.k_layernorm.weight"] = take("self_attn.k_norm.weight").clone()
        out[dst + "self_attention.linear_proj.weight"] = _tp_chunk(take("self_attn.o_proj.weight"), tp_size, tp_rank, 1)
        out[dst + "pre_mlp_layernorm.weight"] = take("post_attention_layernorm.weight").clone()
        if src + "mlp.experts.gate_up_proj" not in hf_sd:
            out.update(_gated_mlp(take, "mlp.", dst + "mlp.", tp_size, tp_rank))
        else:
            out.update(_moe_mlp(take, hf_sd, src, dst, tp_size, tp_rank, ep_size, ep_rank, etp_size, etp_rank))
        unused = sorted(k for k in hf_sd if k.startswith(src) and k not in used)
        if unused:
            raise KeyError(f"HF tensors the converter does not know how to place: {unused}")

    if pre_process:
        out["embedding.word_embeddings.weight"] = _vocab_rows(
            hf_sd["model.embed_tokens.weight"], padded_vocab, tp_size, tp_rank
        )
    if post_process:
        out["decoder.final_layernorm.weight"] = hf_sd["model.norm.weight"].clone()
        if not tied:
            out["output_layer.weight"] = _vocab_rows(hf_sd["lm_head.weight"], padded_vocab, tp_size, tp_rank)
    return out
