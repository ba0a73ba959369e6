"""Every megatron-core internal refit relies on, in one place (checked against `TESTED_VERSIONS`).

refit reads a Megatron-Core model as Megatron itself describes it, not by parameter names:
`parallel_state`'s getters, the module classes that decide a parameter's role, the attributes
`set_tensor_model_parallel_attributes` sets on parameters, the MoE layer that holds experts, each layer's global
`layer_number`, a GPTModel's own attributes, the `.module` chain of its wrappers and the chain of a
Megatron optimizer. megatron-core is imported only inside these functions. When an upgrade moves
one of them, the contract tests (`tests/unit/test_compat_megatron.py`) and the calls here fail with
a message naming the installed version and the tested ones.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refit.errors import ConfigError, DependencyError

TESTED_VERSIONS = ("0.16.1", "0.19.2")


def version() -> str:
    """The installed megatron-core version ("unknown" if it cannot be told, "missing" if absent)."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        pass
    try:
        from megatron.core import package_info
    except ImportError:
        return "missing"
    return str(getattr(package_info, "__version__", "unknown"))


def _moved(what: str) -> str:
    tested = ", ".join(TESTED_VERSIONS)
    return f"megatron-core {version()} (refit is tested with {tested}): {what} is missing or changed"


def require(condition: object, what: str) -> None:
    """Raise DependencyError naming the installed and tested versions unless `condition` holds.

    `what` names the internal, e.g. "parallel_state.get_tensor_model_parallel_rank".
    """
    if not condition:
        raise DependencyError(_moved(what))


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(_moved(f"module {module}")) from exc


def _attr(obj: Any, name: str, where: str) -> Any:
    value = getattr(obj, name, None)
    require(value is not None, f"{where}.{name}")
    return value


# -- parallel_state -------------------------------------------------------------------------------

_PS = "megatron.core.parallel_state"

# field of `MegatronRanks` -> the parallel_state getter that answers it
_GETTERS = {
    "tp_rank": "get_tensor_model_parallel_rank",
    "tp_size": "get_tensor_model_parallel_world_size",
    "pp_rank": "get_pipeline_model_parallel_rank",
    "pp_size": "get_pipeline_model_parallel_world_size",
    "dp_rank": "get_data_parallel_rank",
    "dp_size": "get_data_parallel_world_size",
    "ep_rank": "get_expert_model_parallel_rank",
    "ep_size": "get_expert_model_parallel_world_size",
    "etp_rank": "get_expert_tensor_parallel_rank",
    "etp_size": "get_expert_tensor_parallel_world_size",
    "edp_rank": "get_expert_data_parallel_rank",
    "edp_size": "get_expert_data_parallel_world_size",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class MegatronRanks:
    """This process's place in every Megatron parallel group refit reads.

    tp/pp/dp: tensor, pipeline and data parallel (dp without context parallel, as Megatron's default).
    ep/etp/edp: expert model parallel, expert tensor parallel and expert data parallel (MoE layers).
    """

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    ep_rank: int
    ep_size: int
    etp_rank: int
    etp_size: int
    edp_rank: int
    edp_size: int


def model_parallel_is_initialized() -> bool:
    """Whether `parallel_state.initialize_model_parallel` has run in this process."""
    ps = _import(_PS)
    return bool(_attr(ps, "model_parallel_is_initialized", "parallel_state")())


def parallel_ranks() -> MegatronRanks:
    """Every rank and size of `MegatronRanks`; parallel_state must be initialised."""
    ps = _import(_PS)
    return MegatronRanks(**{field: int(_attr(ps, getter, "parallel_state")()) for field, getter in _GETTERS.items()})


# -- modules: what decides a parameter's role ---------------------------------------------------------

_VOCAB_EMBEDDING = ("megatron.core.tensor_parallel.layers", "VocabParallelEmbedding")
_ATTENTION = ("megatron.core.transformer.attention", "Attention")
_MLP = ("megatron.core.transformer.mlp", "MLP")
_MOE_LAYER = ("megatron.core.transformer.moe.moe_layer", "MoELayer")


def _class(where: tuple[str, str]) -> type:
    cls = _attr(_import(where[0]), where[1], where[0])
    require(isinstance(cls, type), f"{where[0]}.{where[1]} as a class")
    return cls


def is_vocab_parallel_embedding(module: nn.Module) -> bool:
    """A vocabulary-parallel embedding table (its rows are the padded vocabulary, split over TP)."""
    return isinstance(module, _class(_VOCAB_EMBEDDING))


def fused_qkv(module: nn.Module) -> nn.Module | None:
    """The fused `linear_qkv` of an attention module; None for other modules (or attention without one)."""
    if not isinstance(module, _class(_ATTENTION)):
        return None
    return getattr(module, "linear_qkv", None)


def gated_fc1(module: nn.Module) -> nn.Module | None:
    """The `linear_fc1` (`[gate; up]` per rank) of an MLP with a gated linear unit; None otherwise."""
    if not isinstance(module, _class(_MLP)):
        return None
    if not _attr(module, "config", "MLP").gated_linear_unit:
        return None
    return _attr(module, "linear_fc1", "MLP")


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEParts:
    """What refit reads of one MoELayer: its routed experts, the global ids it holds, its router's bias."""

    experts: nn.Module  # SequentialMLP (`local_experts.{j}.linear_fc*`) or TEGroupedMLP (`linear_fc*.weight{j}`)
    local_expert_ids: tuple[int, ...]  # global expert id of local expert j
    expert_bias: torch.Tensor | None  # the router's persistent `expert_bias` buffer, when enabled


def moe_parts(module: nn.Module) -> MoEParts | None:
    """The routed experts of a MoELayer; None for any other module.

    Expert parameters are recognised by where they sit, not by a marker: Megatron sets its expert
    marker (`allreduce=False`) only under expert parallelism > 1. The router's `expert_bias` is made
    fp32 first, as Megatron's router does before it runs (see below).
    """
    if not isinstance(module, _class(_MOE_LAYER)):
        return None
    experts = _attr(module, "experts", "MoELayer")
    ids = tuple(int(i) for i in _attr(module, "local_expert_indices", "MoELayer"))
    router = _attr(module, "router", "MoELayer")
    if getattr(router, "expert_bias", None) is not None:
        # Megatron keeps the bias fp32 in a bf16 / fp16 model: after a cast (`.bfloat16()`, Float16Module)
        # its router's next forward, save or load swaps in new fp32 storage. Done here first, so the tensor
        # read (and registered) is the storage Megatron keeps, not one it is about to drop.
        maintain = getattr(router, "_maintain_float32_expert_bias", None)
        require(callable(maintain), "TopKRouter._maintain_float32_expert_bias")
        maintain()
    return MoEParts(experts=experts, local_expert_ids=ids, expert_bias=getattr(router, "expert_bias", None))


# -- parameters: set_tensor_model_parallel_attributes ------------------------------------------------------


def tensor_parallel_split(param: torch.Tensor) -> tuple[int, int] | None:
    """(partition_dim, partition_stride) of a tensor-parallel parameter; None if it is not split.

    Megatron marks split parameters with `tensor_model_parallel=True`, `partition_dim` and
    `partition_stride` (set_tensor_model_parallel_attributes); unmarked ones are whole on every rank.
    """
    if not getattr(param, "tensor_model_parallel", False):
        return None
    require(hasattr(param, "partition_dim"), "parameter attribute partition_dim")
    return int(param.partition_dim), int(getattr(param, "partition_stride", 1))


# -- GPTModel attributes, wrappers, layers -----------------------------------------------------------------


def is_gpt_model(module: nn.Module) -> bool:
    """A Megatron-Core GPTModel (or a model with its shape): it has a `decoder` and a `config`."""
    return hasattr(module, "decoder") and hasattr(module, "config")


def unwrap_model(module: nn.Module) -> nn.Module:
    """Strip DDP / Float16Module style wrappers: each keeps the model it wraps in `.module`."""
    while not hasattr(module, "decoder") and isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


_DDP = ("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel")


def ddp_wrapper(module: nn.Module) -> nn.Module | None:
    """The Megatron `DistributedDataParallel` in a chunk's `.module` chain; None if it has none.

    Its parameters are views of its contiguous param buffers (`buffers[i].param_data`), so they must
    never be moved elsewhere (refit's arena consolidation would detach them from DDP).
    """
    while isinstance(module, nn.Module):
        # The class is imported only for a candidate: megatron.core.distributed pulls in the optimizers.
        if hasattr(module, "ddp_config") and isinstance(module, _class(_DDP)):
            return module
        if hasattr(module, "decoder"):
            return None
        module = getattr(module, "module", None)
    return None


def defers_param_gather(ddp: nn.Module) -> bool:
    """Whether `ddp` leaves the param all-gather to the next forward's pre-hooks (`use_forward_hook`).

    DDP sets it from its config: 0.16.1 with `use_distributed_optimizer` and `overlap_param_gather`;
    0.19 with `overlap_param_gather` alone (the layer-wise distributed optimizer's case too). A step
    then updates only the rank's own part of each param buffer; without it the step gathers.
    """
    _attr(ddp, "ddp_config", "DistributedDataParallel")
    require(hasattr(ddp, "use_forward_hook"), "DistributedDataParallel.use_forward_hook")
    return bool(ddp.use_forward_hook)


def gather_params(ddp: nn.Module) -> None:
    """Complete `ddp`'s param all-gather now (a collective over its data-parallel group).

    `start_param_sync(force_sync=True)` waits for an all-gather already in flight, or runs one
    synchronously, for every bucket group, and leaves each group `param_gather_dispatched` with no
    handle: the next forward's pre-hook (`finish_param_sync`) then neither gathers again nor waits,
    and the next `finish_grad_sync` clears the flag for the step after, as in Megatron's own loop.
    """
    sync = _attr(ddp, "start_param_sync", "DistributedDataParallel")
    groups = [*_attr(ddp, "bucket_groups", "DistributedDataParallel")]
    groups += getattr(ddp, "expert_parallel_bucket_groups", [])
    for group in groups:
        require(hasattr(group, "param_gather_dispatched"), "_ParamAndGradBucketGroup.param_gather_dispatched")
    sync(force_sync=True)


def model_config(chunk: nn.Module) -> Any:
    """The chunk's TransformerConfig."""
    return _attr(chunk, "config", "GPTModel")


def padded_vocab_size(chunk: nn.Module) -> int:
    """Rows of the vocabulary tables, padding included (`GPTModel.vocab_size`)."""
    return int(_attr(chunk, "vocab_size", "GPTModel"))


def shares_embeddings(chunk: nn.Module) -> bool:
    """Whether the output layer is the word embedding (`share_embeddings_and_output_weights`)."""
    require(hasattr(chunk, "share_embeddings_and_output_weights"), "GPTModel.share_embeddings_and_output_weights")
    return bool(chunk.share_embeddings_and_output_weights)


def is_first_stage(chunk: nn.Module) -> bool:
    """Whether the chunk holds the input embedding (`pre_process`)."""
    require(hasattr(chunk, "pre_process"), "GPTModel.pre_process")
    return bool(chunk.pre_process)


def output_layer(chunk: nn.Module) -> nn.Module | None:
    """The chunk's output (logits) layer; None on chunks that do not hold it."""
    return getattr(chunk, "output_layer", None)


def layer_numbers(chunk: nn.Module) -> list[int]:
    """Megatron's 1-based global `layer_number` of each of the chunk's decoder layers, in local order.

    It already accounts for pipeline stages, virtual pipeline chunks and uneven stages.
    """
    decoder = _attr(chunk, "decoder", "GPTModel")
    layers = _attr(decoder, "layers", "GPTModel.decoder")
    numbers = []
    for layer in layers:
        require(hasattr(layer, "layer_number"), "TransformerLayer.layer_number")
        numbers.append(int(layer.layer_number))
    return numbers


# -- TransformerConfig ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class TransformerShape:
    """The TransformerConfig fields refit reads, with Megatron's defaults resolved."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # num_attention_heads when the config leaves it unset
    kv_channels: int  # hidden_size // num_attention_heads when unset
    ffn_hidden_size: int
    gated_linear_unit: bool
    add_qkv_bias: bool
    add_bias_linear: bool
    qk_layernorm: bool
    num_moe_experts: int  # 0: dense
    moe_ffn_hidden_size: int  # each routed expert's FFN (0 for a dense model)
    moe_shared_expert_size: int  # the shared experts' FFN (0: none)
    moe_shared_expert_gate: bool
    multi_latent_attention: bool
    # MLATransformerConfig's fields (0 unless multi_latent_attention; q_lora_rank 0: no query latent)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_head_dim: int = 0  # the no-rope part of a q / k head (HF qk_nope_head_dim)
    qk_pos_emb_head_dim: int = 0  # the rope part (HF qk_rope_head_dim)
    v_head_dim: int = 0
    mtp_num_layers: int = 0  # multi-token prediction layers (0: none)


def transformer_shape(config: Any) -> TransformerShape:
    """The fields of a TransformerConfig that describe the model's tensors."""
    for field in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        require(isinstance(getattr(config, field, None), int), f"TransformerConfig.{field}")
    # megatron-core 0.19's generalized TP (`tensor_parallel_num_weight_shards` > TP) splits every weight
    # again over an axis of its own that no parameter attribute describes: refit would publish a part
    # of a shard as the whole shard.
    gtp = int(getattr(config, "gtp_weight_remat_size", 1) or 1)
    if gtp > 1:
        raise ConfigError(
            f"TransformerConfig.tensor_parallel_num_weight_shards={config.tensor_parallel_num_weight_shards} "
            f"(generalized tensor parallelism, gtp_weight_remat_size={gtp}) is not supported: refit reads "
            "weights split over tensor parallelism only"
        )
    heads = config.num_attention_heads
    experts = int(getattr(config, "num_moe_experts", None) or 0)
    mla = bool(getattr(config, "multi_latent_attention", False))
    if mla:
        for field in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            require(isinstance(getattr(config, field, None), int), f"MLATransformerConfig.{field}")
    return TransformerShape(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(config, "num_query_groups", None) or heads,
        kv_channels=getattr(config, "kv_channels", None) or config.hidden_size // heads,
        ffn_hidden_size=config.ffn_hidden_size,
        gated_linear_unit=bool(getattr(config, "gated_linear_unit", False)),
        add_qkv_bias=bool(getattr(config, "add_qkv_bias", False)),
        add_bias_linear=bool(getattr(config, "add_bias_linear", False)),
        qk_layernorm=bool(getattr(config, "qk_layernorm", False)),
        num_moe_experts=experts,
        moe_ffn_hidden_size=int(getattr(config, "moe_ffn_hidden_size", None) or config.ffn_hidden_size)
        if experts
        else 0,
        moe_shared_expert_size=int(getattr(config, "moe_shared_expert_intermediate_size", None) or 0),
        moe_shared_expert_gate=bool(getattr(config, "moe_shared_expert_gate", False)),
        multi_latent_attention=mla,
        q_lora_rank=int(getattr(config, "q_lora_rank", None) or 0) if mla else 0,
        kv_lora_rank=int(getattr(config, "kv_lora_rank", None) or 0) if mla else 0,
        qk_head_dim=int(getattr(config, "qk_head_dim", None) or 0) if mla else 0,
        qk_pos_emb_head_dim=int(getattr(config, "qk_pos_emb_head_dim", None) or 0) if mla else 0,
        v_head_dim=int(getattr(config, "v_head_dim", None) or 0) if mla else 0,
        mtp_num_layers=int(getattr(config, "mtp_num_layers", None) or 0),
    )


# -- optimizers -------------------------------------------------------------------------------------------


def torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a torch or Megatron optimizer (chained ones included).

    A ChainedOptimizer lists its members in `chained_optimizers`; every other Megatron optimizer
    wraps one torch optimizer in `.optimizer`. A chain is walked before `.optimizer` is read:
    ChainedOptimizer's `optimizer` property asserts that the chain has exactly one member.
    """
    found: list[torch.optim.Optimizer] = []
    stack = [optimizer]
    while stack:
        opt = stack.pop()
        if isinstance(opt, torch.optim.Optimizer):
            if all(opt is not f for f in found):
                found.append(opt)
            continue
        chain = getattr(opt, "chained_optimizers", None)
        if chain is not None:
            stack.extend(reversed(list(chain)))
            continue
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            stack.append(inner)
    return found
