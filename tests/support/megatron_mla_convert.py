"""Independent HF DeepSeek-V3 -> Megatron-Core MLA converter used as ground truth (pure torch, no `refit`).

Owns the per-rank *local* state dict of a Megatron-Core 0.16.1 GPTModel chunk with multi-latent
attention, built with the local (non-Transformer-Engine) layer spec and `qk_layernorm=True` (which
gives the spec real `q_layernorm` / `kv_layernorm` modules), from an HF `DeepseekV3ForCausalLM`
state dict (transformers 5.x). docs/mla_conventions.md has the table and how each entry was verified.

Attention (every projection is a `ColumnParallelLinear` in the local spec: TP rank r holds the r-th of
TP equal contiguous row blocks, the down projections too; Megatron all-gathers their outputs):
* `q_a_proj` `[q_lora, H]` -> `linear_q_down_proj`; `q_a_layernorm` -> `q_layernorm` (replicated);
* `q_b_proj` `[nh * (nope + rope), q_lora]` -> `linear_q_up_proj` (or, without `q_lora_rank`, `q_proj`
  -> `linear_q_proj`): per head `[no-rope | rope]` rows on both sides, so a plain row split is a
  split by heads;
* `kv_a_proj_with_mqa` `[kv_lora + rope, H]` -> `linear_kv_down_proj`: `[latent | rope]` on both sides;
  the TP blocks cut the concatenation, not each part;
* `kv_a_layernorm` -> `kv_layernorm` (replicated);
* `kv_b_proj` `[nh * (nope + v), kv_lora]` -> `linear_kv_up_proj`: per head `[k no-rope | v]` on both;
* `o_proj` `[H, nh * v]` -> `linear_proj`, split on dim 1.
No rope permutation: HF with `rope_interleave=True` (DeepSeek-V3's default) rotates pairs
`(x0, x1), (x2, x3), ...`; Megatron with `multi_latent_attention` de-interleaves (`t[0::2], t[1::2]`)
before its half-rotation: the same rotation of the same weights.

MoE layers: `mlp.gate.weight` -> `mlp.router.weight` and the *buffer* `mlp.gate.e_score_correction_bias`
-> the buffer `mlp.router.expert_bias` (both replicated, fp32); routed experts by global id over EP/ETP
and the ungated shared experts (`mlp.shared_experts.*`, split over TP) as in megatron_convert.py.
Layers below `first_k_dense_replace` have HF's dense `mlp.{gate,up,down}_proj`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tests.support.megatron_convert import _gated_mlp, _tp_chunk, _vocab_rows

_HF_LAYER = "model.layers.{}."


def _config(case_or_config: Any) -> Mapping[str, Any]:
    cfg = getattr(case_or_config, "hf_config", case_or_config)
    if not isinstance(cfg, Mapping):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)  # a transformers config object
    return cfg


def _mla_attention(take: Callable[[str], torch.Tensor], dst: str, q_lora: bool, tp_size: int, tp_rank: int) -> dict:
    """One layer's attention: the HF tensors under `self_attn.`, the Megatron ones under `dst`."""

    def rows(name: str) -> torch.Tensor:
        return _tp_chunk(take("self_attn." + name), tp_size, tp_rank, 0)

    a = dst + "self_attention."
    out = {}
    if q_lora:
        out[a + "linear_q_down_proj.weight"] = rows("q_a_proj.weight")
        out[a + "q_layernorm.weight"] = take("self_attn.q_a_layernorm.weight").clone()
        out[a + "linear_q_up_proj.weight"] = rows("q_b_proj.weight")
    else:
        out[a + "linear_q_proj.weight"] = rows("q_proj.weight")
    out[a + "linear_kv_down_proj.weight"] = rows("kv_a_proj_with_mqa.weight")
    out[a + "kv_layernorm.weight"] = take("self_attn.kv_a_layernorm.weight").clone()
    out[a + "linear_kv_up_proj.weight"] = rows("kv_b_proj.weight")
    out[a + "linear_proj.weight"] = _tp_chunk(take("self_attn.o_proj.weight"), tp_size, tp_rank, 1)
    return out


def _deepseek_moe(
    take: Callable[[str], torch.Tensor],
    dst: str,
    tp_size: int,
    tp_rank: int,
    ep_size: int,
    ep_rank: int,
    etp_size: int,
    etp_rank: int,
) -> dict[str, torch.Tensor]:
    m = dst + "mlp."
    out = {
        m + "router.weight": take("mlp.gate.weight").clone(),
        m + "router.expert_bias": take("mlp.gate.e_score_correction_bias").clone(),
    }
    gate_up, down = take("mlp.experts.gate_up_proj"), take("mlp.experts.down_proj")
    experts, ffn = gate_up.shape[0], gate_up.shape[1] // 2
    if experts % ep_size:
        raise ValueError(f"{dst}: {experts} experts do not split over EP={ep_size}")
    per_rank = experts // ep_size
    for j in range(per_rank):
        expert = ep_rank * per_rank + j
        gate = _tp_chunk(gate_up[expert, :ffn], etp_size, etp_rank, 0)
        up = _tp_chunk(gate_up[expert, ffn:], etp_size, etp_rank, 0)
        local = m + f"experts.local_experts.{j}."
        out[local + "linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[local + "linear_fc2.weight"] = _tp_chunk(down[expert], etp_size, etp_rank, 1)
    out.update(_gated_mlp(take, "mlp.shared_experts.", m + "shared_experts.", tp_size, tp_rank))
    return out


def hf_to_megatron_mla_local(
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
    """The local Megatron state dict of one (TP, EP, ETP) rank of one chunk of a DeepSeek-V3 model.

    Same contract as `megatron_convert.hf_to_megatron_local`: `layers` are the global layer ids of the
    chunk (HF `model.layers.{layers[i]}` -> `decoder.layers.{i}`), `pre_process` adds the embeddings,
    `post_process` the final norm and output layer; every HF tensor of the selected layers must be
    placed, or KeyError. The result includes the persistent buffer `mlp.router.expert_bias`.
    """
    cfg = _config(case_or_config)
    q_lora = cfg.get("q_lora_rank") is not None
    etp_size = tp_size if etp_size is None else etp_size
    for name, rank, size in (("tp", tp_rank, tp_size), ("ep", ep_rank, ep_size), ("etp", etp_rank, etp_size)):
        if not 0 <= rank < size:
            raise ValueError(f"{name}_rank {rank} outside {name.upper()}={size}")
    heads = int(cfg["num_attention_heads"])
    if heads % tp_size:
        raise ValueError(f"{heads} attention heads do not split over TP={tp_size}")
    out: dict[str, torch.Tensor] = {}
    for local, layer in enumerate(layers):
        src, dst = _HF_LAYER.format(layer), f"decoder.layers.{local}."
        used: set[str] = set()

        def take(name: str, *, _src: str = src, _used: set[str] = used) -> torch.Tensor:
            _used.add(_src + name)
            return hf_sd[_src + name]

        out[dst + "input_layernorm.weight"] = take("input_layernorm.weight").clone()
        out.update(_mla_attention(take, dst, q_lora, tp_size, tp_rank))
        out[dst + "pre_mlp_layernorm.weight"] = take("post_attention_layernorm.weight").clone()
        if src + "mlp.experts.gate_up_proj" in hf_sd:
            out.update(_deepseek_moe(take, dst, tp_size, tp_rank, ep_size, ep_rank, etp_size, etp_rank))
        else:
            out.update(_gated_mlp(take, "mlp.", dst + "mlp.", tp_size, tp_rank))
        unused = sorted(k for k in hf_sd if k.startswith(src) and k not in used)
        if unused:
            raise KeyError(f"HF tensors the MLA converter does not know how to place: {unused}")

    if pre_process:
        out["embedding.word_embeddings.weight"] = _vocab_rows(
            hf_sd["model.embed_tokens.weight"], padded_vocab, tp_size, tp_rank
        )
    if post_process:
        out["decoder.final_layernorm.weight"] = hf_sd["model.norm.weight"].clone()
        if not cfg.get("tie_word_embeddings", False):
            out["output_layer.weight"] = _vocab_rows(hf_sd["lm_head.weight"], padded_vocab, tp_size, tp_rank)
    return out
