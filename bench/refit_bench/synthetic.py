"""Synthetic Llama-shaped Megatron models, dense or mixture-of-experts, for the demo and the benchmarks
(no weights downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, kw_only=True, slots=True)
class Shape:
    """A Llama-style decoder shape; with `num_experts`, every layer's MLP is a MoE of gated experts
    (Mixtral / Qwen3-MoE style: router, `num_experts` experts of `moe_ffn_hidden_size`, no shared one)."""

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

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_params(self) -> int:
        h, d = self.hidden_size, self.kv_channels
        qkv = (self.num_attention_heads + 2 * self.num_query_groups) * d * h
        mlp = 3 * self.ffn_hidden_size * h
        if self.num_experts:
            mlp = self.num_experts * (3 * self.moe_ffn_hidden_size * h + h)  # experts and router rows
        layer = qkv + self.num_attention_heads * d * h + mlp + 2 * h
        return self.num_layers * layer + 2 * self.vocab_size * h + h


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
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    if device == "cuda":
        model_parallel_cuda_manual_seed(1234)  # GPU initialisation draws from Megatron's RNG tracker

    config = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.kv_channels,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=device == "cpu",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        **_moe_config(shape),
    )
    if shape.num_experts:  # one spec per layer: the MoE layers' MLP is a MoELayer
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
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


def hf_engine_model(shape: Shape, *, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Any:
    """An HF LlamaForCausalLM of `shape` (random weights) to refit into."""
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
