"""Synthetic Megatron models for the demo and the benchmarks (no weights downloaded): Llama-shaped,
dense or mixture-of-experts, and DeepSeek-V3-shaped (multi-latent attention, DeepSeek MoE)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, kw_only=True, slots=True)
class Shape:
    """A Llama-style decoder shape; with `num_experts`, every layer's MLP is a MoE of gated experts
    (Mixtral / Qwen3-MoE style: router, `num_experts` experts of `moe_ffn_hidden_size`, no shared one).

    With `kv_lora_rank`, a DeepSeek-V3-architecture shape: multi-latent attention (q / kv down
    projections of `q_lora_rank` / `kv_lora_rank`, per-head `qk_nope_head_dim` + `qk_rope_head_dim`
    query/key dims and `v_head_dim` values), the first `dense_layers` layers dense, the rest DeepSeek
    MoE (sigmoid router with an expert bias, `shared_experts` shared experts beside the routed ones).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_topk: int = 2
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    dense_layers: int = 0
    shared_experts: int = 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def kv_channels(self) -> int:
        return self.v_head_dim if self.mla else self.hidden_size // self.num_attention_heads

    @property
    def num_params(self) -> int:
        if self.mla:
            return self._mla_params()
        h, d = self.hidden_size, self.kv_channels
        qkv = (self.num_attention_heads + 2 * self.num_query_groups) * d * h
        mlp = 3 * self.ffn_hidden_size * h
        if self.num_experts:
            mlp = self.num_experts * (3 * self.moe_ffn_hidden_size * h + h)  # experts and router rows
        layer = qkv + self.num_attention_heads * d * h + mlp + 2 * h
        return self.num_layers * layer + 2 * self.vocab_size * h + h

    def _mla_params(self) -> int:
        h, heads, qk = self.hidden_size, self.num_attention_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
        attn = (
            h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * qk  # q down, norm, up
            + h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank  # kv down, norm
            + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)  # kv up
            + heads * self.v_head_dim * h  # output projection
        )  # fmt: skip
        dense = 3 * self.ffn_hidden_size * h
        experts = self.num_experts + self.shared_experts
        moe = experts * 3 * self.moe_ffn_hidden_size * h + self.num_experts * h  # experts and router rows
        moe_layers = self.num_layers - self.dense_layers
        per_layer = attn + 2 * h
        return self.num_layers * per_layer + self.dense_layers * dense + moe_layers * moe + 2 * self.vocab_size * h + h


SHAPES = {
    s.name: s
    for s in (
        Shape(name="llama-tiny", num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=2,
              ffn_hidden_size=512, vocab_size=1024),
        Shape(name="llama-100m", num_layers=8, hidden_size=768, num_attention_heads=12, num_query_groups=4,
              ffn_hidden_size=2048, vocab_size=32000),
        Shape(name="llama-1b", num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
              ffn_hidden_size=8192, vocab_size=128256),
        # Llama-3-8B's layer and vocabulary shapes with half the layers: 9.1 GB of bf16, so trainer,
        # staging and engine copies fit one 80 GB GPU together.
        Shape(name="llama-8gb", num_layers=16, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
              ffn_hidden_size=14336, vocab_size=128256),
        Shape(name="llama-3-8b", num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
              ffn_hidden_size=14336, vocab_size=128256),
        Shape(name="moe-tiny", num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=2,
              ffn_hidden_size=512, vocab_size=1024, num_experts=8, moe_ffn_hidden_size=128),
        # MoE: 32 experts of 512 per layer, top 4 (0.94 GB of bf16, most of it in experts).
        Shape(name="moe-1b", num_layers=8, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
              ffn_hidden_size=4096, vocab_size=32000, num_experts=32, moe_ffn_hidden_size=512, moe_topk=4),
        # Qwen3-30B-A3B's layer shapes (128 experts of 768, top 8) with 12 of its 48 layers: 16 GB of bf16.
        Shape(name="qwen3-30b-a3b-12l", num_layers=12, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
              ffn_hidden_size=6144, vocab_size=151936, num_experts=128, moe_ffn_hidden_size=768, moe_topk=8),
        # DeepSeek-V3's architecture at a CPU size: MLA (q/kv LoRA ranks, nope + rope query/key dims),
        # one dense first layer, then MoE layers of 8 routed experts (top 2) and 1 shared expert,
        # sigmoid router with expert bias. 19.3M parameters, 39 MB of bf16.
        Shape(name="deepseek-v3-tiny", num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=8,
              ffn_hidden_size=1024, vocab_size=4096, num_experts=8, moe_ffn_hidden_size=256, moe_topk=2,
              q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
              dense_layers=1, shared_experts=1),
    )
}  # fmt: skip


def init_trainer_rank(
    rank: int, world_size: int, port: int, *, tp: int, pp: int, ep: int = 1, etp: int | None = None
) -> None:
    """torch.distributed (gloo) and Megatron parallel state for one trainer process.

    `port` is that of the parent's `procs.rendezvous()` store. `ep` / `etp`: expert parallel and
    expert tensor parallel sizes (MoE shapes; Megatron's ETP defaults to TP).
    """
    from megatron.core import parallel_state as ps

    from refit_bench.procs import join_group

    join_group("gloo", rank=rank, world_size=world_size, port=port)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )  # fmt: skip


def build_gpt(shape: Shape, *, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Any:
    """A Megatron-Core GPTModel of `shape` for this rank's TP/PP coordinates (random weights)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from refit_bench.mla_cpu import cpu_current_device, local_cpu_fields, mla_local_spec

    if device == "cuda":
        model_parallel_cuda_manual_seed(1234)  # GPU initialisation draws from Megatron's RNG tracker

    config = (MLATransformerConfig if shape.mla else TransformerConfig)(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.kv_channels,
        ffn_hidden_size=shape.ffn_hidden_size,
        **local_cpu_fields(),
        use_cpu_initialization=device == "cpu",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        **_moe_config(shape),
        **_mla_config(shape),
    )
    if shape.mla:  # local spec made buildable without TE, one spec per layer (dense first, then MoE)
        spec = mla_local_spec(config)
    elif shape.num_experts:  # one spec per layer: the MoE layers' MLP is a MoELayer
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    with cpu_current_device() if device == "cpu" else contextlib.nullcontext():
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=shape.vocab_size,
            max_sequence_length=4096,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
        )
    if device == "cuda":
        model = model.cuda()  # the MoE router creates its weight on the CPU whatever the initialisation
    # Megatron's Float16Module would cast every parameter (norms too) to the training dtype.
    return model.to(dtype)


def _moe_config(shape: Shape) -> dict[str, Any]:
    """MoE fields of the TransformerConfig: SequentialMLP experts and the allgather dispatcher, which
    megatron-core builds without CUDA (its alltoall dispatcher creates a CUDA stream)."""
    from megatron.core import parallel_state as ps

    if not shape.num_experts:
        return {}
    return {
        "num_moe_experts": shape.num_experts,
        "moe_ffn_hidden_size": shape.moe_ffn_hidden_size,
        "moe_router_topk": shape.moe_topk,
        "moe_token_dispatcher_type": "allgather",
        "moe_grouped_gemm": False,
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size(),
    }


def _mla_config(shape: Shape) -> dict[str, Any]:
    """MLA and DeepSeek-MoE fields of the MLATransformerConfig (the reader infers `deepseek_v3`).

    Real q / kv latent norms (`qk_layernorm`; identity otherwise), plain RoPE over the rope dims,
    dense first layers by `moe_layer_freq`, a sigmoid router with an expert bias (an fp32 buffer the
    publisher serves too) and the shared expert. Routing options that change no tensor are left out."""
    if not shape.mla:
        return {}
    moe_layers = shape.num_layers - shape.dense_layers
    return {
        "q_lora_rank": shape.q_lora_rank or None,
        "kv_lora_rank": shape.kv_lora_rank,
        "qk_head_dim": shape.qk_nope_head_dim,
        "qk_pos_emb_head_dim": shape.qk_rope_head_dim,
        "v_head_dim": shape.v_head_dim,
        "qk_layernorm": True,
        "rope_type": "rope",
        "rotary_scaling_factor": 1.0,
        "moe_layer_freq": [0] * shape.dense_layers + [1] * moe_layers,
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_shared_expert_intermediate_size": shape.shared_experts * shape.moe_ffn_hidden_size or None,
    }


def hf_engine_model(shape: Shape, *, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Any:
    """An HF LlamaForCausalLM of `shape` (random weights) to refit into."""
    if shape.mla:
        raise ValueError(f"{shape.name} is a DeepSeek-V3-architecture shape: no Llama engine model for it")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_query_groups,
        head_dim=shape.kv_channels,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()
