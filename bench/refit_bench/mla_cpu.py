"""What megatron-core (0.16.1 to 0.19.x) needs to build a multi-latent attention GPTModel without CUDA or Transformer
Engine, for the bench (`reader_sources` on the meta device, `synthetic.build_gpt` on CPU).

The test trainers (tests/support/megatron_mla.py) build their MLA models with the same classes from
here (tests may import bench, never the reverse); the library itself never patches Megatron.
megatron-core is imported lazily.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def local_cpu_fields() -> dict[str, Any]:
    """TransformerConfig fields of a Llama-style model built with the local spec on a machine without
    TE or fused kernels: RMSNorm, SwiGLU, no biases or dropout, every fusion off."""
    import torch.nn.functional as F

    return dict(
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
    )


@contextlib.contextmanager
def cpu_current_device() -> Iterator[None]:
    """megatron-core 0.16.1's RotaryEmbedding asks `torch.cuda.current_device()` for its `inv_freq`
    (a few floats) whatever the initialisation; on a CPU-only torch that raises. Answer "cpu" while
    the model is built, and restore the real function after."""
    if torch.cuda.is_available():
        yield
        return
    real = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.current_device = real  # type: ignore[assignment]


def mla_core_attention() -> type:
    """The local core attention given MLA's `k_channels` / `v_channels` keywords, which megatron-core
    0.16.1's local `DotProductAttention` does not take (only TE's does). Its forward already handles
    k and v head sizes that differ except for the output width, taken from `kv_channels`: set here
    from `v_channels`."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kw: Any):
            super().__init__(*args, **kw)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MLADotProductAttention


def mla_self_attention() -> type | None:
    """From megatron-core 0.19, the MLA self-attention that builds no query norm without a query latent
    (`q_lora_rank=None`), as 0.16.1 did and as HF DeepSeek has; None before 0.19.

    0.19 resolves the norms itself (`_resolve_qk_norm_config`) and, with `qk_layernorm` and no query
    latent, wants a fused norm + `linear_q_proj`, which the local backend cannot build."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    if not hasattr(MLASelfAttention, "_resolve_qk_norm_config"):
        return None
    from megatron.core.transformer.identity_op import IdentityOp

    class NoQueryNormMLASelfAttention(MLASelfAttention):
        def _resolve_qk_norm_config(self, submodules: Any) -> dict[str, Any]:
            if self.config.q_lora_rank is not None or not self.config.qk_layernorm:
                return super()._resolve_qk_norm_config(submodules)
            return {
                "linear_q_proj": submodules.linear_q_proj,
                "linear_q_up_proj": IdentityOp,
                "linear_kv_up_proj": submodules.linear_kv_up_proj,
                "q_layernorm": IdentityOp,
                "kv_layernorm": submodules.kv_layernorm,
            }

    return NoQueryNormMLASelfAttention


def mla_local_spec(config: Any) -> Any:
    """The local-spec decoder block of an MLATransformerConfig, made buildable without TE.

    Without TE, `megatron.core.extensions.transformer_engine` still imports (with MagicMock stand-ins),
    so the MLA module believes TE is there and `isinstance(..., TELinear)` fails: this build uses no
    TE, say so (process-wide, idempotent). Every layer gets the MLA-aware core attention (and, from
    0.19, self-attention)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    core = mla_core_attention()
    attention = mla_self_attention()
    for layer_spec in spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = core
        if attention is not None:
            layer_spec.submodules.self_attention.module = attention
    return spec
