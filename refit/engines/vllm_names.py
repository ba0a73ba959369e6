"""How Hugging Face checkpoint tensors map onto a vLLM model's parameters (used by `refit.engines.vllm`).

vLLM's `load_weights` fuses some HF projections into one parameter and loads each through the fused
parameter's weight loader with a shard id (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`,
DeepSeek's two MLA down projections into `fused_qkv_a_proj`); routed experts go into the fused expert
layer of their decoder layer (`w13_weight`, `w2_weight`). These rules follow vLLM 0.32's own mappings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from refit.compat import vllm as compat
from refit.errors import ModelMismatchError

# HF projection -> (vLLM fused parameter, shard id), as vLLM's Llama/Qwen2/Qwen3 `load_weights` map them.
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


# DeepSeek-V2/V3 (MLA): `q_proj` (no query latent) is a layer of its own; with a query latent vLLM fuses the
# two replicated down projections into `fused_qkv_a_proj`, as its `load_weights` maps them.
_MLA_FUSED = {
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "q_a_proj": ("fused_qkv_a_proj", 0),
    "kv_a_proj_with_mqa": ("fused_qkv_a_proj", 1),
}


def fused_projections(architecture: str, params: Iterable[str]) -> Mapping[str, tuple[str, str | int]]:
    """HF projection -> (vLLM fused parameter, shard id) for a model of `architecture` with parameters `params`."""
    if architecture != "deepseek_v3":
        return _FUSED
    if any(n.endswith(".fused_qkv_a_proj.weight") for n in params):
        return _MLA_FUSED
    return {k: v for k, v in _MLA_FUSED.items() if v[0] != "fused_qkv_a_proj"}


# A routed expert's HF name, and the shard vLLM's fused expert loader calls each projection.
_EXPERT = re.compile(r"^(?P<layer>.*\.layers\.\d+)\.mlp\.experts\.(?P<e>\d+)\.(?P<proj>\w+_proj)\.weight$")
_EXPERT_SHARDS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# The MoE block's module name in vLLM where it is not the HF checkpoint's `mlp` (router and experts).
_MOE_BLOCK = {"mixtral": "block_sparse_moe"}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExpertLoad:
    """Where one routed expert's HF tensor goes in vLLM: its fused expert layer's parameter, shard, expert id."""

    module: str  # the routed-experts layer (vLLM's `RoutedExperts`)
    param: str  # full parameter name (`...experts.w13_weight`)
    shard: str  # "w1" (gate), "w3" (up), "w2" (down)
    expert: int  # global expert id


def vllm_target(
    hf_name: str, architecture: str = "", fused: Mapping[str, tuple[str, str | int]] = _FUSED
) -> tuple[str, str | int | None]:
    """The vLLM parameter a dense HF tensor loads into, and the shard id its weight loader takes.

    `architecture` (refit's id) applies vLLM's own module names (Mixtral's router is `block_sparse_moe.gate`);
    `fused` is the model's `fused_projections`.
    """
    block = _MOE_BLOCK.get(architecture)
    if block and ".mlp.gate." in hf_name:
        hf_name = hf_name.replace(".mlp.gate.", f".{block}.gate.")
    parts = hf_name.split(".")
    if len(parts) >= 2 and parts[-2] in fused:
        param, shard = fused[parts[-2]]
        return ".".join([*parts[:-2], param, parts[-1]]), shard
    return hf_name, None


def expert_target(hf_name: str, experts: Mapping[str, str]) -> ExpertLoad | None:
    """The load of a routed expert's HF tensor, or None for any other name.

    `experts` maps each decoder layer's prefix (`model.layers.3`) to its routed-experts module's name.
    """
    m = _EXPERT.match(hf_name)
    if m is None or m["proj"] not in _EXPERT_SHARDS:
        return None
    module = experts.get(m["layer"])
    if module is None:
        raise ModelMismatchError(f"{hf_name}: vLLM has no routed experts in {m['layer']}")
    shard = _EXPERT_SHARDS[m["proj"]]
    return ExpertLoad(module=module, param=f"{module}.{compat.EXPERT_PARAMS[shard]}", shard=shard, expert=int(m["e"]))
