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

Architecture = Literal["llama", "qwen2", "qwen3"]

_HF_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
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

    def __post_init__(self) -> None:
        if self.architecture not in _HF_CLASSES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {sorted(_HF_CLASSES)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}")
        cfg = self.hf_config
        if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
            raise ValueError(f"{self.id}: num_attention_heads must be a multiple of num_key_value_heads")

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
# Vocab 1000 padded to multiples of 384 x TP: 1152 rows at TP 1 but 1536 at TP 2.
LLAMA_PAD384 = dataclasses.replace(LLAMA_PADDED, id="llama-pad384", make_vocab_size_divisible_by=384)

CASES: dict[str, ModelCase] = {
    c.id: c
    for c in (LLAMA_GQA, LLAMA_1KV_TIED, QWEN2_BIAS, QWEN3_QKNORM, LLAMA_PADDED, LLAMA_4L, LLAMA_BF16, LLAMA_PAD384)
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
    not left at 1.0 so that a norm routed to the wrong place changes the result.
    """
    import transformers

    model_cls = getattr(transformers, _HF_CLASSES[case.architecture][1])
    model = model_cls(hf_config(case))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            value = 1.0 + 0.1 * noise if param.ndim == 1 and "norm" in name else 0.02 * noise
            param.copy_(value.to(param.dtype))
    model.to(case.torch_dtype)
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
