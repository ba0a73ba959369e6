"""What refit reads off a vLLM model: its MoE and vocabulary checks, routed-expert modules, parameters
sharing storage, the shapes vLLM recorded before a reload, and the reload roots (a decoder layer, or a
module of its own) that layerwise installs are scoped to. Helpers of `refit.engines.vllm`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from refit.compat import vllm as compat
from refit.engines.vllm_names import ExpertLoad
from refit.errors import ModelMismatchError
from refit.plan.shapes import model_tensors
from refit.plan.targets import EngineLayout, Target, targets_for
from refit.types import ModelMeta


def expert_problems(
    name: str, shape: tuple[int, ...], held: list[int], loads: list[tuple[ExpertLoad, Target]]
) -> list[str]:
    """A fused expert parameter `[experts, rows, cols]` must hold exactly the planned experts, each whole.

    vLLM's slots must hold the plan's experts in ascending order (its linear placement: EP rank r holds
    the r-th contiguous block), and each expert's shards must fill a slot: gate then up rows of `w13`, `w2` whole.
    """
    planned = sorted({load.expert for load, _ in loads})
    if held != planned:
        return [f"{name}: vLLM's slots hold experts {held}, the plan gives {planned}"]
    per_expert: dict[int, list[Target]] = {}
    for load, target in sorted(loads, key=lambda lt: lt[0].shard):  # w1 (gate) before w3 (up)
        per_expert.setdefault(load.expert, []).append(target)
    for expert, targets in per_expert.items():
        rows = sum(t.shape[0] for t in targets)
        if len(shape) != 3 or shape[0] != len(held) or (rows, *targets[0].shape[1:]) != shape[1:]:
            return [f"{name}: {list(shape)} in vLLM, expert {expert} gives {[list(t.shape) for t in targets]}"]
    return []


def vocab_problems(name: str, target: Target, held: tuple[int, int], table_rows: int) -> list[str]:
    """The rows of the real vocabulary vLLM's layer holds must be exactly the target's rows."""
    start, stop = held
    rows = target.rows[0] if target.rows else (start, start)
    if stop - start != rows[1] - rows[0] or (stop > start and rows[0] != start) or stop - start > table_rows:
        return [f"{name}: vLLM holds vocabulary rows [{start}, {stop}), the plan gives [{rows[0]}, {rows[1]})"]
    return []


def num_experts(config: Any) -> int:
    return int(
        getattr(config, "num_experts", None)
        or getattr(config, "num_local_experts", None)
        or getattr(config, "n_routed_experts", None)
        or 0
    )


def shared_expert_ffn(config: Any) -> int:
    """The shared experts' FFN: Qwen2-MoE's `shared_expert_intermediate_size`, DeepSeek's
    `n_shared_experts * moe_intermediate_size` (0: none)."""
    qwen = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
    deepseek = int(getattr(config, "n_shared_experts", 0) or 0) * int(getattr(config, "moe_intermediate_size", 0) or 0)
    return qwen or deepseek


def layer_prefix(module_name: str) -> str:
    """`model.layers.3` of `model.layers.3.mlp.experts` (a module inside a decoder layer)."""
    m = re.match(r"^(.*?\.layers\.\d+)\.", module_name)
    if m is None:
        raise ModelMismatchError(f"vLLM expert layer {module_name!r} is not inside a decoder layer")
    return m[1]


def routed_experts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> vLLM's routed-experts layer (one per MoE decoder layer; a second one would be left unfed
    and fail the start-up check)."""
    return {n: m for n, m in model.named_modules() if compat.is_routed_experts(m)}


def targets(model: ModelMeta, layout: EngineLayout, moe_layers: frozenset[int], shared: int) -> dict[str, Target]:
    """The targets an engine rank holds, by target name: the planner's targets of every tensor of the model."""
    return {t.hf_name: t for desc in model_tensors(model, moe_layers, shared) for t in targets_for(model, desc, layout)}


def aliases(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter name -> the other names of the same parameter (a tied output layer's `lm_head.weight`).

    Layerwise reload gives every layer its own parameter and processes only the layers it loaded
    (vLLM's documented limitation), so a tied layer fed nothing would keep what its processing
    derived from the old values (on CPU: the output layer's packed copy of the embedding table).
    """
    names: dict[int, list[str]] = {}
    # A parameter the reload leaves in place (DeepSeek's router bias, shared with the expert layer) stays one
    # tensor: loaded once. Each module once: a module reached by two paths (vLLM's MoE runner holds the
    # router) is one layer, no alias.
    in_place = compat.never_reloaded()
    for prefix, module in model.named_modules():
        for key, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if key in in_place:
                continue
            names.setdefault(id(param), []).append(f"{prefix}.{key}" if prefix else key)
    return {n: tuple(o for o in group if o != n) for group in names.values() if len(group) > 1 for n in group}


def recorded_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes as vLLM created them (before CPU repacking emptied some), by full name."""
    live = dict(model.named_parameters())  # shared parameters (a tied lm_head) appear once
    out: dict[str, tuple[int, ...]] = {}
    unrecorded = compat.never_reloaded()  # a `bias` created after the weights, DeepSeek's router bias
    for prefix, module in model.named_modules():
        params, _ = compat.recorded_tensors(module)
        live_own = module.named_parameters(recurse=False)
        own = {**params, **{name: p for name, p in live_own if name in unrecorded and name not in params}}
        for name, tensor in own.items():
            full = f"{prefix}.{name}" if prefix else name
            if full in live:
                out[full] = tuple(tensor.shape)
    return out


def reload_root(param: str) -> str:
    """The module a layerwise reload of `param` covers: its decoder layer, else the module holding it."""
    m = re.match(r"^(.*?\.layers\.\d+)\.", param)
    return m[1] if m else param.rpartition(".")[0]


def root_order(root: str) -> int:
    """Embeddings first, then the decoder layers in order, then the rest (final norm, output layer)."""
    m = re.search(r"\.layers\.(\d+)$", root)
    if m:
        return int(m[1]) + 1
    return 0 if "embed" in root else 1 << 30


def layer_order(name: str) -> tuple[int, str]:
    """Embeddings first, then layer by layer (so at most one layer is materialized at a time), then the rest."""
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) + 1, name
    return (0 if "embed" in name else 1 << 30), name
