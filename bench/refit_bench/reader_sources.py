"""Trainer sources from the library's own Megatron reader, over a real GPTModel that holds no weights.

`refit-bench plan --from-reader` builds a megatron-core 0.16 `GPTModel` of the model config on the
meta device (shapes, dtypes and tensor-parallel attributes, no memory), in this process at world 1
(TP1 PP1 EP1, gloo), and reads it with `refit.megatron.model` exactly as the publisher does: global
names, roles (from module types and TP attributes), global shapes, dtypes, global expert ids, the
routers' `expert_bias` buffers, and the `ModelMeta`. Those global tensors are then cut into one
`SourceRecord` per rank of the scenario's trainer layout by `trainer_sources.shard_sources` (the
library's `TensorDesc.shard`, the same rank bookkeeping as the synthetic generator). So the modelled
plan is built from what the reader gives a user, not from a hand-written tensor list.

Covered: multi-latent attention models (DeepSeek-V3, Kimi-K2: configs with `kv_lora_rank`); other
configs keep the synthetic generator. What the model is, and why it differs from the synthetic one:

* Megatron-Core's local layer spec (Transformer Engine is not needed here and may not be installed):
  separate `q_layernorm` / `kv_layernorm` / `pre_mlp_layernorm` (the TE spec fuses them into the next
  linear as `layer_norm_weight`: same bytes), SequentialMLP experts (`local_experts.{e}`; TEGroupedMLP's
  `linear_fc1.weight{e}`: same bytes), and the q / kv down projections split over TP on dim 0 (the TE
  spec keeps them whole): at trainer TP > 1 each TP rank publishes a slice instead of a copy.
* `Float16Module`'s cast to bf16 (router weights and norms too); the router keeps `expert_bias` in
  fp32 as Megatron does. `linear_dtype` (FP8 on the wire) applies to the same GEMM weights as in the
  synthetic generator: every 2-D tensor except the vocabulary tables and the router.
* Pipeline stages: the model is built whole at PP1 and its layers are placed on stages with the same
  `stage_layers` split as the synthetic generator (a layout choice, not something the reader decides).
* MTP layers are not built (the reader refuses them; HF builds none to refit).
* The architecture is the one a publisher infers by default (`deepseek_v3` for every MLA model), not
  the config's `model_type` (Kimi-K2's `kimi_k2` has no HF name mapping of its own).

megatron-core is imported lazily (the `megatron` extra).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from typing import Any

import torch

from refit.dtypes import dtype_name
from refit.errors import ConfigError
from refit.types import ModelMeta, Role, SourceRecord
from refit_bench.mla_cpu import cpu_current_device, local_cpu_fields, mla_local_spec
from refit_bench.trainer_sources import VOCAB_DIVISIBLE_BY, GlobalTensor, TrainerLayout, shard_sources, stage_layers

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")
_EXPERT_ROLES = (Role.EXPERT_COLUMN, Role.EXPERT_GATED_COLUMN, Role.EXPERT_ROW, Role.EXPERT_REPLICATED)


def supports(cfg: dict[str, Any]) -> bool:
    """Whether the reader path builds this config (multi-latent attention models)."""
    return "kv_lora_rank" in cfg


@contextlib.contextmanager
def _world_of_one() -> Iterator[None]:
    """torch.distributed (gloo, in-process store) and Megatron parallel state at world 1, torn down after.

    A process that already has a group of one with model parallelism initialised keeps it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        if dist.get_world_size() != 1 or not ps.model_parallel_is_initialized():
            raise ConfigError("the reader path builds its model at world 1: run it outside a distributed job")
        if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_expert_model_parallel_world_size() != 1:
            raise ConfigError("the reader path needs TP1 EP1 model parallel state")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _config(cfg: dict[str, Any]) -> Any:
    """The MLATransformerConfig of a DeepSeek-V3-architecture HF config (shapes only: routing options
    that do not change a tensor are left at what builds on CPU)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    layers, experts = cfg["num_hidden_layers"], cfg.get("n_routed_experts", 0)
    dense_first = cfg.get("first_k_dense_replace", 0) if experts else layers
    moe: dict[str, Any] = {}
    if experts:
        moe = {
            "num_moe_experts": experts,
            "moe_ffn_hidden_size": cfg["moe_intermediate_size"],
            "moe_layer_freq": [0] * dense_first + [1] * (layers - dense_first),
            "moe_router_topk": cfg.get("num_experts_per_tok", 1),
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": cfg.get("topk_method") == "noaux_tc",
            "moe_router_load_balancing_type": "none",
            "moe_aux_loss_coeff": 0.0,
            "moe_token_dispatcher_type": "allgather",  # the one that builds without CUDA
            "moe_grouped_gemm": False,  # SequentialMLP: the grouped forms need TE
            "moe_shared_expert_intermediate_size": cfg.get("n_shared_experts", 0) * cfg["moe_intermediate_size"]
            or None,
        }
    dtype = getattr(torch, cfg.get("torch_dtype", "bfloat16"))
    return MLATransformerConfig(
        num_layers=layers,
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_attention_heads"],
        kv_channels=cfg["v_head_dim"],
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_head_dim=cfg["qk_nope_head_dim"],
        qk_pos_emb_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        qk_layernorm=True,  # real q / kv latent norms in the local spec (identity otherwise)
        rope_type="rope",
        rotary_scaling_factor=1.0,
        **local_cpu_fields(),
        # CPU initialisation allocates through the default device (meta here); it also sets the TP
        # attributes the reader reads roles from, which `perform_initialization=False` would skip.
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        **moe,
    )


def build_meta_model(cfg: dict[str, Any], *, padded_vocab: int) -> torch.nn.Module:
    """A whole GPTModel of `cfg` on the meta device (call inside a world of one)."""
    from megatron.core.models.gpt import GPTModel

    if not supports(cfg):
        raise ConfigError(f"the reader path builds multi-latent attention models; {cfg.get('model_type')} is not one")
    config = _config(cfg)
    spec = mla_local_spec(config)  # local spec without TE, MLA-aware core attention
    with cpu_current_device(), torch.device("meta"):
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab,
            max_sequence_length=4096,
            pre_process=True,
            post_process=True,
            share_embeddings_and_output_weights=cfg.get("tie_word_embeddings", False),
            position_embedding_type="rope",
        )
    # Megatron's Float16Module casts every parameter (norms and router too) to the training dtype; the
    # router's expert_bias buffer is kept (and published) in fp32 by Megatron itself.
    return model.to(config.params_dtype)


def _is_gemm(t: GlobalTensor) -> bool:
    return len(t.shape) == 2 and t.role is not Role.VOCAB_PARALLEL and not t.name.endswith("router.weight")


def read_tensors(
    cfg: dict[str, Any], *, tp: int, pp: int, linear_dtype: str | None = None
) -> tuple[ModelMeta, list[GlobalTensor]]:
    """The reader's ModelMeta and global tensors of `cfg` (vocabulary padded for trainer TP `tp`), each
    placed on its stage of `pp`, in the reader's order."""
    from refit.megatron.model import local_parameters, model_meta, parallel_coords

    multiple = VOCAB_DIVISIBLE_BY * tp  # Megatron pads to make_vocab_size_divisible_by * TP
    padded = math.ceil(cfg["vocab_size"] / multiple) * multiple
    with _world_of_one():
        model = build_meta_model(cfg, padded_vocab=padded)
        _, _, coords = parallel_coords()
        # The architecture the publisher infers by default (`deepseek_v3` for any MLA model): Kimi-K2's
        # HF model_type `kimi_k2` names no HF mapping of its own (its HF class is DeepseekV3ForCausalLM).
        meta = model_meta([model], architecture=None, vocab_size=cfg["vocab_size"])
        params = local_parameters([model], coords)
    stage_of: list[int] = [s for s, n in enumerate(stage_layers(meta.num_layers, pp)) for _ in range(n)]
    out = []
    for p in params:
        m = _LAYER.match(p.name)
        # Layers on their stage; the embedding on the first stage, final norm and output layer on the last.
        edge = 0 if p.name.startswith("embedding.") else pp - 1
        stage = stage_of[int(m.group(1))] if m is not None else edge
        expert = -1
        if p.role in _EXPERT_ROLES:
            e = _EXPERT.search(p.name)
            if e is None:
                raise ConfigError(f"{p.name}: a routed expert's tensor without a global expert id")
            expert = int(e.group(1))
        t = GlobalTensor(
            name=p.name, role=p.role, shape=p.global_shape, dtype=dtype_name(p.param.dtype), stage=stage,
            expert=expert,
        )  # fmt: skip
        if linear_dtype and _is_gemm(t):
            t = GlobalTensor(name=t.name, role=t.role, shape=t.shape, dtype=linear_dtype, stage=stage, expert=expert)
        out.append(t)
    logger.info("read %d global tensors of %s from a meta-device GPTModel", len(out), cfg["model_type"])
    return meta, out


def reader_sources(
    cfg: dict[str, Any], layout: TrainerLayout, *, linear_dtype: str | None = None
) -> tuple[ModelMeta, list[SourceRecord], list[GlobalTensor]]:
    """The reader's ModelMeta, one SourceRecord per trainer rank of `layout`, and the global tensors."""
    meta, tensors = read_tensors(cfg, tp=layout.tp, pp=layout.pp, linear_dtype=linear_dtype)
    meta, sources = shard_sources(tensors, meta, layout)
    return meta, sources, tensors
