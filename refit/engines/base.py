"""The engine boundary: what a receiver needs from an inference engine, and nothing more.

An engine says what model it serves (`spec`), which tensors under which Hugging Face names its
rank holds (`expected`), where staging memory should live (`device`), and installs a complete set
of tensors into its existing parameter storage (`install`). Each engine adapter (HF transformers
here; vLLM and Megatron inference later) implements this small protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from refit.dtypes import dtype_name
from refit.errors import ModelMismatchError
from refit.types import ModelMeta


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineSpec:
    """The model an engine rank serves, in the terms the catalog's ModelMeta uses."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    tp_rank: int = 0
    tp_size: int = 1
    scheme: str = "hf"  # target names and split: "hf" (transformers, vLLM) or "megatron"
    padded_vocab_size: int = 0  # megatron scheme: the engine's own padded vocabulary


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


@runtime_checkable
class Engine(Protocol):
    """What `Receiver` needs from an inference engine rank."""

    def spec(self) -> EngineSpec: ...

    def expected(self) -> Mapping[str, TensorSpec]: ...

    @property
    def device(self) -> torch.device: ...

    def install(self, tensors: Mapping[str, torch.Tensor]) -> None: ...


def check_compatible(spec: EngineSpec, model: ModelMeta) -> None:
    """Raise ModelMismatchError naming every field where the engine and the catalog disagree.

    An empty `architecture` or a zero `vocab_size` in the spec means "whatever the catalog says".
    """
    diffs = []
    pairs = {
        "architecture": (spec.architecture or model.architecture, model.architecture),
        "num_layers": (spec.num_layers, model.num_layers),
        "hidden_size": (spec.hidden_size, model.hidden_size),
        "num_attention_heads": (spec.num_attention_heads, model.num_attention_heads),
        "num_query_groups": (spec.num_query_groups, model.num_query_groups),
        "kv_channels": (spec.kv_channels, model.kv_channels),
        "ffn_hidden_size": (spec.ffn_hidden_size, model.ffn_hidden_size),
        "tied_embeddings": (spec.tied_embeddings, model.tied_embeddings),
    }
    for field, (engine, catalog) in pairs.items():
        if engine != catalog:
            diffs.append(f"{field}: engine {engine!r} vs catalog {catalog!r}")
    if spec.vocab_size and model.vocab_size and spec.vocab_size != model.vocab_size:
        diffs.append(f"vocab_size: engine {spec.vocab_size} vs catalog {model.vocab_size}")
    elif spec.vocab_size > model.padded_vocab_size:
        diffs.append(f"vocab_size: engine {spec.vocab_size} > catalog's padded {model.padded_vocab_size}")
    if diffs:
        raise ModelMismatchError("engine does not match the catalog's model: " + "; ".join(diffs))


def check_install(expected: Mapping[str, TensorSpec], tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise ModelMismatchError unless `tensors` is exactly the engine's set, each of the right shape and dtype.

    Every engine calls this before writing its first byte, so a refused install changes nothing.
    """
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        raise ModelMismatchError(
            f"install needs exactly this rank's tensors: missing {sorted(missing)[:5]}, unknown {sorted(extra)[:5]}"
        )
    for name, t in tensors.items():
        spec = expected[name]
        if tuple(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
            raise ModelMismatchError(f"{name}: got {tuple(t.shape)} {t.dtype}, engine holds {spec}")


def spec_from_hf_config(config: object, *, architecture: str, tp_rank: int = 0, tp_size: int = 1) -> EngineSpec:
    """The EngineSpec of a model described by a transformers config (HF models, vLLM's hf_config)."""
    c: Any = config
    heads = c.num_attention_heads
    return EngineSpec(
        architecture=architecture,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(c, "num_key_value_heads", None) or heads,
        kv_channels=getattr(c, "head_dim", None) or c.hidden_size // heads,
        ffn_hidden_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        tp_rank=tp_rank,
        tp_size=tp_size,
    )


def check_tensors(expected: Mapping[str, TensorSpec], planned: Mapping[str, TensorSpec]) -> None:
    """Raise ModelMismatchError unless the plan yields exactly the engine's tensors."""
    problems = []
    missing = sorted(set(expected) - set(planned))
    extra = sorted(set(planned) - set(expected))
    if missing:
        problems.append(f"not published: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unknown to the engine: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for name in sorted(set(expected) & set(planned)):
        if expected[name] != planned[name]:
            problems.append(f"{name}: engine {expected[name]} vs catalog {planned[name]}")
    if problems:
        raise ModelMismatchError("engine tensors do not match the catalog: " + "; ".join(problems[:12]))
