"""Small random Hugging Face models: the independent ground truth of the test suite.

Owns the catalogue of model cases (`ModelCase` and the predefined constants), how a case becomes a
deterministic random `transformers` model (no download: built from a config), the "version 2"
perturbation of a state dict, and Megatron's vocab padding rule. It never imports `refit`, and
imports `transformers` only when a model is built, so trainer workers can use the cases cheaply.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Architecture = Literal["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"]

_HF_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}
MOE_ARCHITECTURES = frozenset({"qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"})
# Multi-latent attention (DeepSeek-V3 / Kimi-K2): its shape and Megatron form live in megatron_mla.py.
MLA_ARCHITECTURES = frozenset({"deepseek_v3"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelCase:
    """One model shape: what HF config to build and how Megatron pads its vocab.

    `hf_config` holds the keyword arguments of the architecture's transformers config class
    (`LlamaConfig`, `Qwen2Config`, `Qwen3Config`). It is a plain dict so cases pickle to workers;
    treat it as read-only.
    """

    id: str
    architecture: Architecture
    hf_config: dict[str, Any] = field(hash=False)
    make_vocab_size_divisible_by: int = 128
    dtype: Literal["float32", "bfloat16"] = "float32"
    # MoE only: the router weights are drawn this many times larger so that the top-k choice has wide
    # margins and cannot flip between HF and Megatron over rounding; experts are scaled so they matter.
    router_scale: float = 1.0
    expert_scale: float = 1.0
    # DeepSeek-V3 only: the router's score-correction bias buffer is drawn ~ N(0, router_bias_scale**2),
    # so that a lost or misplaced bias changes which experts some tokens pick.
    router_bias_scale: float = 0.0
    # Attention input projections (all `self_attn.*_proj` but `o_proj`) drawn this many times larger, so
    # that attention is peaked and the head layout and RoPE conventions show in the logits.
    attention_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.architecture not in _HF_CLASSES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {sorted(_HF_CLASSES)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}")
        cfg = self.hf_config
        if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
            raise ValueError(f"{self.id}: num_attention_heads must be a multiple of num_key_value_heads")
        if self.is_moe and self.num_experts < 1:
            raise ValueError(f"{self.id}: a MoE case needs num_experts (num_local_experts for Mixtral)")

    # Shape shortcuts (HF names -> the quantities the Megatron layout is defined by).
    @property
    def hidden_size(self) -> int:
        return int(self.hf_config["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.hf_config["num_attention_heads"])

    @property
    def num_query_groups(self) -> int:
        return int(self.hf_config["num_key_value_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.hf_config.get("head_dim") or self.hidden_size // self.num_heads)

    @property
    def ffn_hidden_size(self) -> int:
        return int(self.hf_config["intermediate_size"])

    # MoE shape (HF names -> Megatron quantities); dense cases answer "no experts".
    @property
    def is_moe(self) -> bool:
        return self.architecture in MOE_ARCHITECTURES

    @property
    def num_experts(self) -> int:
        if not self.is_moe:
            return 0
        cfg = self.hf_config
        return int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)

    @property
    def moe_ffn_hidden_size(self) -> int:
        """Routed expert FFN size: Qwen's `moe_intermediate_size`, Mixtral's `intermediate_size`."""
        if self.architecture == "mixtral":
            return self.ffn_hidden_size
        return int(self.hf_config["moe_intermediate_size"])

    @property
    def moe_topk(self) -> int:
        return int(self.hf_config["num_experts_per_tok"])

    @property
    def norm_topk_prob(self) -> bool:
        """Whether the top-k routing probabilities are renormalised (Mixtral always does)."""
        return self.architecture == "mixtral" or bool(self.hf_config.get("norm_topk_prob", False))

    @property
    def is_mla(self) -> bool:
        return self.architecture in MLA_ARCHITECTURES

    @property
    def shared_expert_ffn_size(self) -> int | None:
        """Qwen2-MoE's shared expert (always gated by `shared_expert_gate`); None elsewhere (DeepSeek-V3's
        ungated shared experts are described in megatron_mla.py)."""
        if self.architecture != "qwen2_moe":
            return None
        return int(self.hf_config["shared_expert_intermediate_size"])

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        """Per layer: True where HF builds a sparse MoE block (transformers' Qwen*Moe decoder-layer rule)."""
        if not self.is_moe:
            return (False,) * self.num_layers
        if self.architecture == "mixtral":
            return (True,) * self.num_layers
        if self.architecture == "deepseek_v3":
            return tuple(i >= int(self.hf_config["first_k_dense_replace"]) for i in range(self.num_layers))
        dense = set(self.hf_config.get("mlp_only_layers", ()))
        step = int(self.hf_config.get("decoder_sparse_step", 1))
        return tuple(i not in dense and (i + 1) % step == 0 for i in range(self.num_layers))

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def tied(self) -> bool:
        return bool(self.hf_config.get("tie_word_embeddings", False))

    @property
    def rope_theta(self) -> float:
        if "rope_theta" in self.hf_config:
            return float(self.hf_config["rope_theta"])
        return float(self.hf_config.get("rope_parameters", {}).get("rope_theta", 10000.0))

    @property
    def rms_norm_eps(self) -> float:
        return float(self.hf_config.get("rms_norm_eps", 1e-6))

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCase:
        return cls(**{**data, "hf_config": dict(data["hf_config"])})


def _cfg(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return {**base, **overrides}


# vocab 512 with divisible_by 64 is never padded for TP <= 8; LLAMA_PADDED is padded for every TP.
LLAMA_GQA = ModelCase(
    "llama-gqa",
    "llama",
    _cfg(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0),
    make_vocab_size_divisible_by=64,
)
LLAMA_1KV_TIED = ModelCase(
    "llama-1kv-tied", "llama", _cfg(num_key_value_heads=1, tie_word_embeddings=True), make_vocab_size_divisible_by=64
)
QWEN2_BIAS = ModelCase("qwen2-bias", "qwen2", _cfg(rope_theta=1000000.0), make_vocab_size_divisible_by=64)
QWEN3_QKNORM = ModelCase(
    "qwen3-qknorm",
    "qwen3",
    _cfg(hidden_size=128, intermediate_size=256, num_key_value_heads=4, rope_theta=1000000.0),
    make_vocab_size_divisible_by=64,
)
LLAMA_PADDED = ModelCase("llama-padded", "llama", _cfg(vocab_size=1000), make_vocab_size_divisible_by=128)
LLAMA_4L = ModelCase("llama-4l", "llama", _cfg(num_hidden_layers=4), make_vocab_size_divisible_by=64)
LLAMA_BF16 = dataclasses.replace(LLAMA_GQA, id="llama-gqa-bf16", dtype="bfloat16")
# Megatron's dynamic inference engine (GPU only): FlashAttention-4 takes head_dim 64, not 32; long sequences.
LLAMA_DYNAMIC = dataclasses.replace(
    LLAMA_BF16,
    id="llama-dynamic-bf16",
    hf_config=_cfg(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        rope_theta=500000.0, max_position_embeddings=1024,
    ),
)  # fmt: skip
# Vocab 1000 padded to multiples of 384 x TP: 1152 rows at TP 1 but 1536 at TP 2.
LLAMA_PAD384 = dataclasses.replace(LLAMA_PADDED, id="llama-pad384", make_vocab_size_divisible_by=384)

# Mixture of experts: 4 layers, 4 experts, top 2. Dense layers sit on both sides of the PP=2 stage
# boundary (Qwen3-MoE: MoE, dense | dense, MoE; Qwen2-MoE: dense, MoE | dense, MoE); Mixtral has none.
_MOE_SCALES = dict(router_scale=100.0, expert_scale=5.0)
QWEN3_MOE = ModelCase(
    "qwen3-moe",
    "qwen3_moe",
    _cfg(
        num_hidden_layers=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1, 2],
        norm_topk_prob=True,
        rope_theta=1000000.0,
    ),
    make_vocab_size_divisible_by=64,
    **_MOE_SCALES,
)
MIXTRAL = ModelCase(
    "mixtral",
    "mixtral",
    _cfg(num_hidden_layers=4, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, rope_theta=1000000.0),
    make_vocab_size_divisible_by=64,
    **_MOE_SCALES,
)
QWEN2_MOE = ModelCase(
    "qwen2-moe-shared",
    "qwen2_moe",
    _cfg(
        num_hidden_layers=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        norm_topk_prob=False,
        rope_theta=1000000.0,
    ),
    make_vocab_size_divisible_by=64,
    **_MOE_SCALES,
)
# fp32 only: in bf16 the scaled router and experts amplify rounding (a megatron-core TP2 EP2 ETP2
# model differed from HF by 0.5 in the logits), so a bf16 MoE logits comparison proves little.
MOE_CASES = (QWEN3_MOE, MIXTRAL, QWEN2_MOE)
# bf16 MoE for refits, where weights are compared bit for bit and logits HF against HF.
QWEN3_MOE_BF16 = dataclasses.replace(QWEN3_MOE, id="qwen3-moe-bf16", dtype="bfloat16")

# DeepSeek-V3 architecture (Kimi-K2 too): multi-latent attention with every head dim distinct (q/k no-rope
# 16, rope 8, v 12), a dense first layer, then MoE layers: sigmoid router over 8 experts in 2 groups
# (1 group, then 2 experts of it, per token: top-2 in a group, as HF hard-codes), a non-zero
# score-correction bias, one ungated shared expert. fp32, like the other MoE ground truths.
_DSV3 = {k: v for k, v in _cfg(num_key_value_heads=4).items() if k != "head_dim"}  # HF: head_dim = rope dim
DEEPSEEK_V3 = ModelCase(
    "deepseek-v3",
    "deepseek_v3",
    {
        **_DSV3,
        "num_hidden_layers": 4,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "q_lora_rank": 32,
        "kv_lora_rank": 24,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
        "first_k_dense_replace": 1,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rope_interleave": True,
    },
    make_vocab_size_divisible_by=64,
    # Sigmoid scores (not logits) decide: a moderate router scale keeps them off 0 and 1, where they
    # would tie; the bias is large enough to change most tokens' experts.
    router_scale=25.0,
    expert_scale=5.0,
    router_bias_scale=0.3,
    attention_scale=10.0,
)
# Without a query latent: q_proj straight from the hidden states (DeepSeek-V2-Lite style).
DEEPSEEK_V3_NO_QLORA = dataclasses.replace(
    DEEPSEEK_V3, id="deepseek-v3-no-qlora", hf_config={**DEEPSEEK_V3.hf_config, "q_lora_rank": None}
)
MLA_CASES = (DEEPSEEK_V3, DEEPSEEK_V3_NO_QLORA)

CASES: dict[str, ModelCase] = {
    c.id: c
    for c in (
        LLAMA_GQA,
        LLAMA_1KV_TIED,
        QWEN2_BIAS,
        QWEN3_QKNORM,
        LLAMA_PADDED,
        LLAMA_4L,
        LLAMA_BF16,
        LLAMA_DYNAMIC,
        LLAMA_PAD384,
        *MOE_CASES,
        QWEN3_MOE_BF16,
        *MLA_CASES,
    )
}


def get_case(case: ModelCase | Mapping[str, Any] | str) -> ModelCase:
    """A case given as itself, its `to_dict()` form or its registered id."""
    if isinstance(case, ModelCase):
        return case
    if isinstance(case, str):
        try:
            return CASES[case]
        except KeyError:
            raise KeyError(f"unknown model case {case!r}; known: {sorted(CASES)}") from None
    return ModelCase.from_dict(case)


def padded_vocab(case: ModelCase, tp: int) -> int:
    """Megatron-LM's padded vocab: the next multiple of `make_vocab_size_divisible_by * tp`."""
    multiple = case.make_vocab_size_divisible_by * tp
    return math.ceil(case.vocab_size / multiple) * multiple


def hf_config(case: ModelCase) -> Any:
    """The transformers config object of `case` (eager attention, so numerics do not depend on SDPA kernels)."""
    import transformers

    config_cls = getattr(transformers, _HF_CLASSES[case.architecture][0])
    config = config_cls(**case.hf_config)
    config._attn_implementation = "eager"
    return config


def build_hf_model(case: ModelCase, seed: int) -> torch.nn.Module:
    """A random HF causal LM for `case`, in eval mode, identical for identical `(case, seed)`.

    Every parameter is redrawn from a generator seeded with `seed` (construction-time init is
    ignored): matrices ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.02). Norms are
    not left at 1.0 so that a norm routed to the wrong place changes the result. MoE routers
    (`mlp.gate.weight`) are multiplied by `case.router_scale` and routed experts (`mlp.experts.*`)
    and shared experts (`mlp.shared_expert*`, the gate too) by `case.expert_scale`, attention input
    projections (`self_attn.*proj`, not `o_proj`) by `case.attention_scale`. DeepSeek-V3's
    score-correction bias buffers (`mlp.gate.e_score_correction_bias`) ~ N(0, case.router_bias_scale**2),
    kept fp32 whatever the case's dtype (HF's `_keep_in_fp32_modules_strict`).
    """
    import transformers

    model_cls = getattr(transformers, _HF_CLASSES[case.architecture][1])
    model = model_cls(hf_config(case))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            value = 1.0 + 0.1 * noise if param.ndim == 1 and "norm" in name else 0.02 * noise
            if name.endswith(".mlp.gate.weight"):
                value = value * case.router_scale
            elif ".mlp.experts." in name or ".mlp.shared_expert" in name:
                value = value * case.expert_scale
            elif ".self_attn." in name and name.endswith("proj.weight") and not name.endswith("o_proj.weight"):
                value = value * case.attention_scale
            param.copy_(value.to(param.dtype))
        for name, buffer in model.named_buffers():  # drawn after every parameter: other cases are unchanged
            if name.endswith(".mlp.gate.e_score_correction_bias"):
                noise = torch.randn(buffer.shape, generator=gen, dtype=torch.float32)
                buffer.copy_((case.router_bias_scale * noise).to(buffer.dtype))
    model.to(case.torch_dtype)
    for name, buffer in model.named_buffers():  # fp32 in any dtype, as HF loads it (and Megatron keeps it)
        if name.endswith(".e_score_correction_bias"):
            buffer.data = buffer.data.float()
    return model.eval()


def perturbed_state_dict(sd: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A copy of `sd` where every element of every tensor differs (a "version 2" of the weights).

    Each element moves by +-[0.01, 0.02) (computed in fp32, cast back; elements that round back to
    their old value are pushed by one more step). Keys that alias one tensor (tied embeddings)
    stay aliased in the result.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    by_storage: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    for name, tensor in sd.items():
        alias = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if alias in by_storage:
            out[name] = by_storage[alias]
            continue
        base = tensor.detach().to(torch.float32)
        sign = torch.randint(0, 2, tensor.shape, generator=gen).to(torch.float32) * 2 - 1
        delta = sign * (0.01 + 0.01 * torch.rand(tensor.shape, generator=gen))
        new = (base + delta).to(tensor.dtype)
        same = new == tensor
        if same.any():  # only possible in low precision
            new[same] = (base + 8 * delta)[same].to(tensor.dtype)
        if (new == tensor).any():
            raise AssertionError(f"could not perturb every element of {name}")
        out[name] = new
        by_storage[alias] = new
    return out
