"""Read a Megatron-Core GPTModel: parameter roles, global names, model metadata, rank coordinates.

Roles come from module types and the tensor-parallel attributes Megatron sets on parameters
(`tensor_model_parallel`, `partition_dim`, `partition_stride`), not from names: fused QKV is the
`linear_qkv` of an attention module, the gated fc1 is the `linear_fc1` of an MLP with a gated
linear unit, vocab tables are the word embedding and the GPT output layer. Pipeline-local layer
numbers become global through each layer's own `layer_number`, which already accounts for virtual
pipeline chunks and uneven stages. Routed experts are the parameters of a MoELayer's experts module:
renamed to their global expert id (`local_expert_indices`) and placed by expert TP instead of TP; the
router's `expert_bias` buffer is published with them. Multi-latent attention (DeepSeek-V3) needs no
rule of its own: its projections are plain column-parallel (the local spec splits even the q / kv
down projections on dim 0, the TE spec keeps them whole, unmarked: replicated), `linear_proj` is
row-parallel and the latent norms are unmarked (replicated), all from the TP attributes.
Multi-token prediction layers are refused (out of scope). The publisher and `MegatronEngine` both
read models here; every megatron-core internal is reached through `refit.compat.megatron`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from refit.compat import megatron as mcore
from refit.dtypes import dtype_name
from refit.errors import ConfigError, LayoutError
from refit.types import ModelMeta, ParallelCoords, Role, shard_geometry

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
    return mcore.unwrap_model(module)


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
        if not mcore.is_gpt_model(inner):
            raise ConfigError(f"{type(inner).__name__} is not a Megatron-Core GPTModel (no decoder/config)")
        out.append(inner)
    return out


def ddp_wrappers(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The Megatron DistributedDataParallel wrapper of each chunk that has one (see `model_chunks`)."""
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    return [ddp for ddp in (mcore.ddp_wrapper(c) for c in chunks) if ddp is not None]


def parallel_coords() -> tuple[int, int, ParallelCoords]:
    """(global rank, world size, parallel coordinates) of this process, trainer or engine rank."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("torch.distributed must be initialised before reading a Megatron model's parallel layout")
    if not mcore.model_parallel_is_initialized():
        raise ConfigError("megatron.core.parallel_state must be initialised before reading a Megatron model")
    r = mcore.parallel_ranks()
    coords = ParallelCoords(
        tp_rank=r.tp_rank,
        tp_size=r.tp_size,
        pp_rank=r.pp_rank,
        pp_size=r.pp_size,
        ep_rank=r.ep_rank,
        ep_size=r.ep_size,
        dp_rank=r.dp_rank,
        dp_size=r.dp_size,
        etp_rank=r.etp_rank,
        etp_size=r.etp_size,
        edp_rank=r.edp_rank,
        edp_size=r.edp_size,
    )
    return dist.get_rank(), dist.get_world_size(), coords


def infer_architecture(config: object) -> str:
    """Best guess of the HF family from a TransformerConfig; pass `architecture=` to be explicit."""
    shape = mcore.transformer_shape(config)
    if shape.multi_latent_attention:
        # Multi-latent attention with DeepSeek's MoE layer (and dense first layers): DeepSeek-V3, Kimi-K2.
        return "deepseek_v3"
    if shape.num_moe_experts:
        if shape.qk_layernorm:
            return "qwen3_moe"
        if shape.add_qkv_bias or shape.moe_shared_expert_gate:
            return "qwen2_moe"
        return "mixtral"
    if shape.qk_layernorm:
        return "qwen3"
    if shape.add_qkv_bias:
        return "qwen2"
    return "llama"


def model_meta(chunks: Sequence[nn.Module], *, architecture: str | None, vocab_size: int) -> ModelMeta:
    """The model metadata every rank publishes (identical on all ranks)."""
    first = chunks[0]
    cfg = mcore.model_config(first)
    shape = mcore.transformer_shape(cfg)
    if shape.mtp_num_layers:
        raise LayoutError(
            f"multi-token prediction ({shape.mtp_num_layers} MTP layers) is not supported: HF's "
            "DeepseekV3ForCausalLM builds no MTP layers to refit; build the trainer's model without them"
        )
    mla = shape.multi_latent_attention
    # Descriptors carry each tensor's own dtype; the metadata names the one holding most bytes.
    bytes_by_dtype: dict[str, int] = {}
    for p in (p for c in chunks for p in c.parameters()):
        key = dtype_name(p.dtype)
        bytes_by_dtype[key] = bytes_by_dtype.get(key, 0) + p.numel() * p.element_size()
    return ModelMeta(
        architecture=architecture or infer_architecture(cfg),
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        # MLA has no query groups (every head has its own k and v) and its heads' output is v_head_dim.
        num_query_groups=shape.num_attention_heads if mla else shape.num_query_groups,
        kv_channels=shape.v_head_dim if mla else shape.kv_channels,
        ffn_hidden_size=shape.ffn_hidden_size,
        padded_vocab_size=mcore.padded_vocab_size(first),
        vocab_size=vocab_size,
        tied_embeddings=mcore.shares_embeddings(first),
        qkv_bias=shape.add_qkv_bias or shape.add_bias_linear,
        qk_layernorm=shape.qk_layernorm,
        gated_linear_unit=shape.gated_linear_unit,
        num_experts=shape.num_moe_experts,
        moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
        params_dtype=max(bytes_by_dtype, key=bytes_by_dtype.__getitem__),
        q_lora_rank=shape.q_lora_rank,
        kv_lora_rank=shape.kv_lora_rank,
        qk_nope_head_dim=shape.qk_head_dim,
        qk_rope_head_dim=shape.qk_pos_emb_head_dim,
        v_head_dim=shape.v_head_dim,
    )


def _special_roles(chunk: nn.Module) -> dict[int, Role]:
    """id(parameter) -> role for the parameters whose role the module structure decides."""
    roles: dict[int, Role] = {}
    for module in chunk.modules():
        if mcore.is_vocab_parallel_embedding(module):
            roles.update((id(p), Role.VOCAB_PARALLEL) for p in module.parameters(recurse=False))
        elif (qkv := mcore.fused_qkv(module)) is not None:
            roles.update((id(p), Role.QKV_COLUMN) for p in qkv.parameters(recurse=False))
        elif (fc1 := mcore.gated_fc1(module)) is not None:
            roles.update((id(p), Role.GATED_MLP_COLUMN) for p in fc1.parameters(recurse=False))
    output = mcore.output_layer(chunk)
    if output is not None:
        roles.update((id(p), Role.VOCAB_PARALLEL) for p in output.parameters(recurse=False))
    return roles


# A routed expert's parameter within its experts module: SequentialMLP (`local_experts.3.linear_fc1.weight`)
# or TEGroupedMLP (`linear_fc1.weight3`), with the *local* expert index.
_LOCAL_EXPERT = re.compile(
    r"^(?:local_experts\.(?P<j1>\d+)\.linear_fc(?P<fc1>[12])\.(?P<p1>weight|bias)"
    r"|linear_fc(?P<fc2>[12])\.(?P<p2>weight|bias)(?P<j2>\d+))$"
)


def global_expert_name(local_name: str, local_expert_ids: Sequence[int]) -> tuple[str, int, str]:
    """(name with the global expert id, fc number, "weight"/"bias") of a routed expert's parameter.

    `local_name` is relative to the experts module; `local_expert_ids[j]` is local expert j's global id.
    """
    m = _LOCAL_EXPERT.match(local_name)
    if m is None:
        raise LayoutError(
            f"experts.{local_name}: unknown expert parameter (refit reads SequentialMLP and TEGroupedMLP experts; "
            "the legacy GroupedMLP's weight1/weight2 are not supported)"
        )
    j = int(m["j1"] or m["j2"])
    if j >= len(local_expert_ids):
        raise LayoutError(f"experts.{local_name}: local expert {j}, but the layer holds {len(local_expert_ids)}")
    e, fc, kind = local_expert_ids[j], int(m["fc1"] or m["fc2"]), m["p1"] or m["p2"]
    name = f"local_experts.{e}.linear_fc{fc}.{kind}" if m["j1"] is not None else f"linear_fc{fc}.{kind}{e}"
    return name, fc, kind


def _expert_roles(chunk: nn.Module, gated: bool) -> tuple[dict[int, tuple[str, Role]], list[tuple[str, torch.Tensor]]]:
    """id(expert parameter) -> (chunk-level name with the global expert id, role); and the routers'
    expert-bias buffers, which training updates like weights but `named_parameters` does not list."""
    experts: dict[int, tuple[str, Role]] = {}
    buffers: list[tuple[str, torch.Tensor]] = []
    for prefix, module in chunk.named_modules():
        parts = mcore.moe_parts(module)
        if parts is None:
            continue
        for local_name, p in parts.experts.named_parameters():
            name, fc, kind = global_expert_name(local_name, parts.local_expert_ids)
            if fc == 2:
                role = Role.EXPERT_ROW if kind == "weight" else Role.EXPERT_REPLICATED
            else:
                role = Role.EXPERT_GATED_COLUMN if gated else Role.EXPERT_COLUMN
            experts[id(p)] = (f"{prefix}.experts.{name}", role)
        if parts.expert_bias is not None:
            buffers.append((f"{prefix}.router.expert_bias", parts.expert_bias))
    return experts, buffers


def _layer_index_map(chunk: nn.Module) -> dict[int, int]:
    """Local layer index -> global 0-based layer index, for one chunk."""
    return {i: number - 1 for i, number in enumerate(mcore.layer_numbers(chunk))}


def local_parameters(chunks: Sequence[nn.Module], coords: ParallelCoords) -> list[LocalParam]:
    """Every tensor this rank publishes, with its role and place in the global tensor.

    Dense tensors are placed by TP; routed experts by expert TP, under their global expert id.
    """
    out: list[LocalParam] = []
    seen: set[int] = set()
    for chunk in chunks:
        special = _special_roles(chunk)
        experts, buffers = _expert_roles(chunk, mcore.transformer_shape(mcore.model_config(chunk)).gated_linear_unit)
        layers = _layer_index_map(chunk)
        tied_copy = mcore.shares_embeddings(chunk) and not mcore.is_first_stage(chunk)
        for name, param in [*chunk.named_parameters(), *buffers]:
            if id(param) in seen:
                continue
            seen.add(id(param))
            if tied_copy and name == "output_layer.weight":
                # The last stage's copy of tied embeddings: the first stage publishes the original.
                continue
            expert = experts.get(id(param))
            if expert is not None:
                name = expert[0]
            m = _LAYER_PREFIX.match(name)
            if m is not None:
                name = f"decoder.layers.{layers[int(m.group(1))]}." + name[m.end() :]
            if expert is not None:
                out.append(_describe(name, param, expert[1], coords.etp_size, coords.etp_rank))
            else:
                out.append(_describe(name, param, _dense_role(param, special.get(id(param))), coords.tp_size,
                                     coords.tp_rank))  # fmt: skip
    return out


def _dense_role(param: torch.Tensor, special: Role | None) -> Role:
    split = mcore.tensor_parallel_split(param)
    if split is None:
        return Role.REPLICATED
    return special if special is not None else (Role.COLUMN if split[0] == 0 else Role.ROW)


def _describe(name: str, param: torch.Tensor, role: Role, size: int, rank: int) -> LocalParam:
    """`param` as rank `rank` of the `size` ranks (TP, or expert TP) that split tensors of `role`."""
    shape = tuple(param.shape)
    split = mcore.tensor_parallel_split(param)
    dim, stride = role.partition_dim, role.partition_stride
    if dim == -1:
        if split is not None and size > 1:
            raise LayoutError(f"{name}: split on dim {split[0]} over {size} ranks, but a {role.value} tensor is whole")
        return LocalParam(
            name=name, param=param, role=role, partition_dim=-1, partition_stride=1, offset=0, global_shape=shape,
        )  # fmt: skip
    # Megatron marks every split tensor (expert tensors may lack the marks in other linear classes:
    # then the role alone says how they are split).
    if split is not None and split[1] != stride:
        raise LayoutError(f"{name}: partition_stride {split[1]}, but a {role.value} tensor has {stride}")
    if split is not None and split[0] != dim:
        raise LayoutError(f"{name}: split on dim {split[0]}, but a {role.value} tensor is split on {dim}")
    if dim >= len(shape):
        raise LayoutError(f"{name}: a {role.value} tensor split on dim {dim}, but it has shape {list(shape)}")
    global_shape = list(shape)
    global_shape[dim] = shape[dim] * size
    try:
        _, offset = shard_geometry(
            name=name, global_shape=tuple(global_shape), partition_dim=dim, partition_stride=stride,
            rank=rank, size=size,
        )  # fmt: skip
    except ConfigError as exc:
        raise LayoutError(str(exc)) from exc
    return LocalParam(
        name=name, param=param, role=role, partition_dim=dim, partition_stride=stride, offset=offset,
        global_shape=tuple(global_shape),
    )  # fmt: skip
