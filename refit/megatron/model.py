"""Read a Megatron-Core GPTModel: parameter roles, global names, model metadata, rank coordinates.

Roles come from module types and the tensor-parallel attributes Megatron sets on parameters
(`tensor_model_parallel`, `partition_dim`, `partition_stride`), not from names: fused QKV is the
`linear_qkv` of an attention module, the gated fc1 is the `linear_fc1` of an MLP with a gated
linear unit, vocab tables are the word embedding and the GPT output layer. Pipeline-local layer
numbers become global through each layer's own `layer_number`, which already accounts for virtual
pipeline chunks and uneven stages. megatron-core is imported only when these functions run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from refit.dtypes import dtype_name
from refit.errors import ConfigError, LayoutError
from refit.types import ModelMeta, ParallelCoords, Role

_LAYER_PREFIX = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalParam:
    """One parameter of this rank, with what a descriptor needs besides its memory location."""

    name: str  # global Megatron name
    param: torch.Tensor
    role: Role
    partition_dim: int
    partition_stride: int
    offset: int
    global_shape: tuple[int, ...]


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / Float16Module style wrappers (each keeps the real model in `.module`)."""
    while not hasattr(module, "decoder") and isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


def model_chunks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The GPTModel chunks of this rank (one, or one per virtual pipeline stage)."""
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    if not chunks:
        raise ConfigError("model is an empty list of chunks")
    out = []
    for chunk in chunks:
        if not isinstance(chunk, nn.Module):
            raise ConfigError(f"model chunks must be torch modules, got {type(chunk).__name__}")
        inner = unwrap(chunk)
        if not hasattr(inner, "decoder") or not hasattr(inner, "config"):
            raise ConfigError(f"{type(inner).__name__} is not a Megatron-Core GPTModel (no decoder/config)")
        out.append(inner)
    return out


def parallel_coords() -> tuple[int, int, ParallelCoords]:
    """(global rank, world size, parallel coordinates) of this process, trainer or engine rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("torch.distributed must be initialised before reading a Megatron model's parallel layout")
    if not ps.model_parallel_is_initialized():
        raise ConfigError("megatron.core.parallel_state must be initialised before reading a Megatron model")
    coords = ParallelCoords(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
    )
    return dist.get_rank(), dist.get_world_size(), coords


def infer_architecture(config: object) -> str:
    """Best guess of the HF family from a TransformerConfig; pass `architecture=` to be explicit."""
    if getattr(config, "qk_layernorm", False):
        return "qwen3"
    if getattr(config, "add_qkv_bias", False):
        return "qwen2"
    return "llama"


def model_meta(chunks: Sequence[nn.Module], *, architecture: str | None, vocab_size: int) -> ModelMeta:
    """The model metadata every rank publishes (identical on all ranks)."""
    first = chunks[0]
    cfg = first.config
    if getattr(cfg, "num_moe_experts", None):
        raise LayoutError("mixture-of-experts models are not supported yet (expert roles come with MoE work)")
    if getattr(cfg, "multi_latent_attention", False):
        raise LayoutError("multi-latent attention is not supported yet")
    # Descriptors carry each tensor's own dtype; the metadata names the one holding most bytes.
    bytes_by_dtype: dict[str, int] = {}
    for p in (p for c in chunks for p in c.parameters()):
        key = dtype_name(p.dtype)
        bytes_by_dtype[key] = bytes_by_dtype.get(key, 0) + p.numel() * p.element_size()
    heads = cfg.num_attention_heads
    return ModelMeta(
        architecture=architecture or infer_architecture(cfg),
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=heads,
        num_query_groups=cfg.num_query_groups or heads,
        kv_channels=cfg.kv_channels or cfg.hidden_size // heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        padded_vocab_size=first.vocab_size,
        vocab_size=vocab_size,
        tied_embeddings=bool(first.share_embeddings_and_output_weights),
        qkv_bias=bool(cfg.add_qkv_bias or cfg.add_bias_linear),
        qk_layernorm=bool(cfg.qk_layernorm),
        gated_linear_unit=bool(cfg.gated_linear_unit),
        params_dtype=max(bytes_by_dtype, key=bytes_by_dtype.__getitem__),
    )


def _special_roles(chunk: nn.Module) -> dict[int, Role]:
    """id(parameter) -> role for the parameters whose role the module structure decides."""
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.mlp import MLP

    roles: dict[int, Role] = {}
    for module in chunk.modules():
        if isinstance(module, VocabParallelEmbedding):
            roles.update((id(p), Role.VOCAB_PARALLEL) for p in module.parameters(recurse=False))
        elif isinstance(module, Attention) and hasattr(module, "linear_qkv"):
            roles.update((id(p), Role.QKV_COLUMN) for p in module.linear_qkv.parameters(recurse=False))
        elif isinstance(module, MLP) and module.config.gated_linear_unit:
            roles.update((id(p), Role.GATED_MLP_COLUMN) for p in module.linear_fc1.parameters(recurse=False))
    output = getattr(chunk, "output_layer", None)
    if output is not None:
        roles.update((id(p), Role.VOCAB_PARALLEL) for p in output.parameters(recurse=False))
    return roles


def _global_names(chunk: nn.Module) -> dict[int, int]:
    """Local layer index -> global 0-based layer number for one chunk."""
    return {i: int(layer.layer_number) - 1 for i, layer in enumerate(chunk.decoder.layers)}


def local_parameters(chunks: Sequence[nn.Module], coords: ParallelCoords) -> list[LocalParam]:
    """Every parameter this rank publishes, with its role and place in the global tensor."""
    out: list[LocalParam] = []
    seen: set[int] = set()
    for chunk in chunks:
        special = _special_roles(chunk)
        layers = _global_names(chunk)
        tied_copy = chunk.share_embeddings_and_output_weights and not chunk.pre_process
        for name, param in chunk.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            if tied_copy and name == "output_layer.weight":
                # The last stage's copy of tied embeddings: the first stage publishes the original.
                continue
            m = _LAYER_PREFIX.match(name)
            if m is not None:
                name = f"decoder.layers.{layers[int(m.group(1))]}." + name[m.end() :]
            out.append(_describe(name, param, special.get(id(param)), coords.tp_size, coords.tp_rank))
    return out


def _describe(name: str, param: torch.Tensor, special: Role | None, tp_size: int, tp_rank: int) -> LocalParam:
    shape = tuple(param.shape)
    if getattr(param, "allreduce", True) is False:
        raise LayoutError(f"{name} is an expert parameter; MoE is not supported yet")
    if not getattr(param, "tensor_model_parallel", False):
        return LocalParam(
            name=name, param=param, role=Role.REPLICATED, partition_dim=-1, partition_stride=1, offset=0,
            global_shape=shape,
        )  # fmt: skip
    dim = int(param.partition_dim)
    stride = int(getattr(param, "partition_stride", 1))
    role = special if special is not None else (Role.COLUMN if dim == 0 else Role.ROW)
    if role is Role.GATED_MLP_COLUMN and stride != 2:
        raise LayoutError(f"{name}: gated fc1 must have partition_stride 2, has {stride}")
    if role is not Role.GATED_MLP_COLUMN and stride != 1:
        raise LayoutError(f"{name}: unexpected partition_stride {stride} for role {role.value}")
    if shape[dim] % stride:
        raise LayoutError(f"{name}: {shape[dim]} rows do not split into {stride} parts")
    global_shape = list(shape)
    global_shape[dim] = shape[dim] * tp_size
    return LocalParam(
        name=name, param=param, role=role, partition_dim=dim, partition_stride=stride,
        offset=tp_rank * shape[dim] // stride, global_shape=tuple(global_shape),
    )  # fmt: skip
