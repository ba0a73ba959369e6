"""The engine boundary: what a receiver needs from an inference engine, and nothing more.

An engine says what model it serves (`spec`), which tensors under which Hugging Face names its
rank holds (`expected`), where staging memory should live (`device`), and installs a complete set
of tensors into its existing parameter storage (`install`). Each engine adapter (HF transformers
here; vLLM and Megatron inference later) implements this small protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

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
