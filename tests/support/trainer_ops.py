"""Trainer-side model steps run on every rank of a `TrainerCluster` (see cluster.py).

Owns how a real megatron-core 0.16.1 GPTModel is built on CPU from a `ModelCase` (TP / PP / VPP
layouts, and EP / ETP for mixture-of-experts cases; local layer spec; multi-latent attention cases
through megatron_mla.py and megatron_mla_convert.py), filled with an HF checkpoint
through the independent converter, updated in place, run forward and dropped. Each function has the
cluster's signature `fn(state, rank, world_size, **kwargs)` and returns a small picklable value;
models live in `state[key]` (one GPTModel, or a list of chunks with VPP). megatron-core is imported
lazily so the test process can import this module cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tests.support import layouts, megatron_mla
from tests.support.hf_models import ModelCase, get_case, padded_vocab
from tests.support.megatron_convert import hf_to_megatron_local
from tests.support.megatron_mla_convert import hf_to_megatron_mla_local

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def moe_config(case: ModelCase) -> dict[str, Any]:
    """The TransformerConfig fields that make Megatron's MoE layers compute what HF's do; {} when dense.

    * `moe_layer_freq`: HF's per-layer sparse/dense rule (`mlp_only_layers`, `decoder_sparse_step`).
    * Routing: HF takes softmax over all experts, then the top k, and renormalises them when
      `norm_topk_prob` (Mixtral always). Megatron's default (top k of the logits, softmax over those k)
      equals the renormalised form; `moe_router_pre_softmax` (softmax first, top k kept as is) the other.
    * Qwen2-MoE's shared expert is gated by `sigmoid(x @ gate.T)`: `moe_shared_expert_gate`.
    * On CPU: the `allgather` dispatcher (`alltoall` creates a CUDA stream when built) and
      SequentialMLP experts (`moe_grouped_gemm=False`); no load balancing loss, no expert bias.
    """
    if not case.is_moe:
        return {}
    return {
        "num_moe_experts": case.num_experts,
        "moe_ffn_hidden_size": case.moe_ffn_hidden_size,
        "moe_router_topk": case.moe_topk,
        "moe_layer_freq": [int(m) for m in case.moe_layers],
        "moe_router_pre_softmax": not case.norm_topk_prob,
        "moe_router_score_function": "softmax",
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_token_dispatcher_type": "allgather",
        "moe_grouped_gemm": False,
        "moe_shared_expert_intermediate_size": case.shared_expert_ffn_size,
        "moe_shared_expert_gate": case.shared_expert_ffn_size is not None,
    }


def transformer_config(
    case: ModelCase,
    *,
    tp: int,
    pp: int,
    vpp: int | None,
    params_dtype: torch.dtype,
    ep: int = 1,
    etp: int | None = None,
) -> Any:
    """Megatron TransformerConfig equivalent to the HF config of `case` (megatron.md section 5.2); an
    MLATransformerConfig for multi-latent attention cases (megatron_mla.py)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = megatron_mla.config_fields(case) if case.is_mla else moe_config(case)
    if ep != 1 or etp is not None:
        moe.update(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    fields = dict(
        num_layers=case.num_layers,
        hidden_size=case.hidden_size,
        ffn_hidden_size=case.ffn_hidden_size,
        num_attention_heads=case.num_heads,
        num_query_groups=case.num_query_groups,
        kv_channels=case.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=case.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=case.architecture == "qwen2"
        or (case.architecture == "qwen2_moe" and case.hf_config.get("qkv_bias", True)),
        qk_layernorm=case.architecture in ("qwen3", "qwen3_moe"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    config_class = megatron_mla.config_class() if case.is_mla else TransformerConfig
    return config_class(**{**fields, **moe})  # the MLA fields override the GQA attention's


def _chunks(model: Any) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, list) else [model]


def _global_layers(chunk: torch.nn.Module) -> list[int]:
    """Global layer ids of a chunk, read from Megatron itself (`layer_number` is 1-based global)."""
    return [int(layer.layer_number) - 1 for layer in chunk.decoder.layers]


def _converted(state: dict, key: str, hf_sd: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per-chunk local state dicts for the model stored under `key`."""
    from megatron.core import parallel_state as ps

    meta = state[f"{key}/meta"]
    case, tp, vocab = meta["case"], meta["tp"], meta["padded_vocab"]
    tp_rank = ps.get_tensor_model_parallel_rank()
    experts = {}
    if case.is_moe:
        experts = dict(
            ep_size=meta["ep"],
            ep_rank=ps.get_expert_model_parallel_rank(),
            etp_size=meta["etp"],
            etp_rank=ps.get_expert_tensor_parallel_rank(),
        )
    convert = hf_to_megatron_mla_local if case.is_mla else hf_to_megatron_local
    return [
        convert(
            hf_sd,
            case,
            tp_size=tp,
            tp_rank=tp_rank,
            layers=_global_layers(chunk),
            pre_process=chunk.pre_process,
            post_process=chunk.post_process,
            padded_vocab=vocab,
            **experts,
        )
        for chunk in _chunks(state[key])
    ]


def _local_expert_ids(chunk: torch.nn.Module) -> dict[int, list[int]]:
    """Global layer id -> the global expert ids this rank holds there, read from Megatron's MoELayer."""
    return {
        int(layer.layer_number) - 1: [int(i) for i in layer.mlp.local_expert_indices]
        for layer in chunk.decoder.layers
        if hasattr(layer.mlp, "local_expert_indices")
    }


def _load_hf(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def build(
    state: dict,
    rank: int,
    world_size: int,
    *,
    key: str,
    case: ModelCase | Mapping[str, Any] | str,
    hf_path: str,
    tp: int,
    pp: int = 1,
    vpp: int | None = None,
    params_dtype: str | None = None,
    ep: int = 1,
    etp: int | None = None,
) -> dict[str, Any]:
    """Build the GPTModel chunk(s) of this rank for `case` at TP x PP (x VPP), load `hf_path` into them.

    The rest of the world is data parallel. MoE cases also take expert parallelism `ep` and expert
    tensor parallelism `etp` (None: TP); the rest of the world is then expert data parallel too.
    `params_dtype` defaults to the case's dtype; every parameter gets it (as Megatron's Float16Module
    does for bf16 training). The converted state dict must match the model exactly (only
    `*_extra_state` may be missing). `load` and `logits` switch back to the model's layout first.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    case = get_case(case)
    if key in state:
        raise KeyError(f"a model is already stored under {key!r}; drop it first")
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of TP*PP = {tp * pp}")
    etp_size = tp if etp is None else etp
    if (ep != 1 or etp is not None) and not case.is_moe:
        raise ValueError(f"{case.id} has no experts: EP={ep} / ETP={etp} do not apply")
    if world_size % (etp_size * ep * pp):
        raise ValueError(f"world size {world_size} is not a multiple of ETP*EP*PP = {etp_size * ep * pp}")
    if case.is_moe and case.num_experts % ep:
        raise ValueError(f"{case.id}: {case.num_experts} experts do not split over EP={ep}")
    if case.tied and pp > 1:
        raise NotImplementedError(
            f"{case.id}: tied embeddings with PP={pp} cannot run on CPU (megatron-core 0.16.1 calls "
            ".cuda() in setup_embeddings_and_output_layer for the last stage's output_layer copy)"
        )
    if vpp is not None and case.num_layers % (pp * vpp):
        raise ValueError(f"{case.id}: {case.num_layers} layers do not split into PP={pp} x VPP={vpp} chunks")
    dtype = _DTYPES[params_dtype or case.dtype]
    if case.is_mla:
        megatron_mla.apply_cpu_workarounds()
    layouts.ensure_model_parallel(tp, pp, vpp, ep, etp)
    config = transformer_config(case, tp=tp, pp=pp, vpp=vpp, params_dtype=dtype, ep=ep, etp=etp)
    vocab = padded_vocab(case, tp)
    pp_rank = ps.get_pipeline_model_parallel_rank()

    chunks = []
    for vp_stage in [None] if vpp is None else range(vpp):
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
        )
        if case.is_mla:
            megatron_mla.fit_local_spec(spec)
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=int(case.hf_config.get("max_position_embeddings", 128)),
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=case.tied,
            position_embedding_type="rope",
            rotary_base=int(case.rope_theta),
            vp_stage=vp_stage,
        )
        # Like Megatron's Float16Module: the local spec's torch norms are created fp32 whatever params_dtype is.
        chunks.append(chunk.to(dtype).eval())
    state[key] = chunks if vpp is not None else chunks[0]
    state[f"{key}/meta"] = {
        "case": case,
        "tp": tp,
        "pp": pp,
        "vpp": vpp,
        "ep": ep,
        "etp": etp_size,
        "padded_vocab": vocab,
        "layout": (tp, pp, vpp, ep, etp),
    }

    try:
        for chunk, local_sd in zip(chunks, _converted(state, key, _load_hf(hf_path)), strict=True):
            result = chunk.load_state_dict(local_sd, strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
            if missing or result.unexpected_keys:
                raise AssertionError(f"state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    except BaseException:
        drop(state, rank, world_size, key=key)
        raise
    return {
        "rank": rank,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": pp_rank,
        "dp_rank": ps.get_data_parallel_rank(),
        "ep_rank": ps.get_expert_model_parallel_rank(),
        "etp_rank": ps.get_expert_tensor_parallel_rank(),
        "edp_rank": ps.get_expert_data_parallel_rank(),
        "local_experts": [_local_expert_ids(c) for c in chunks],
        "layers": [_global_layers(c) for c in chunks],
        "pre_process": [c.pre_process for c in chunks],
        "post_process": [c.post_process for c in chunks],
        "params": sum(p.numel() for c in chunks for p in c.parameters()),
    }


def load(state: dict, rank: int, world_size: int, *, key: str, hf_path: str) -> dict[str, Any]:
    """Copy new HF weights into the existing parameters and persistent buffers (MLA's router
    `expert_bias`) of `state[key]` in place (storage unchanged)."""
    layouts.ensure_model_parallel(*state[f"{key}/meta"]["layout"])  # the ranks the converter reads are per layout
    hf_sd = _load_hf(hf_path)
    updated = 0
    with torch.no_grad():
        for chunk, local_sd in zip(_chunks(state[key]), _converted(state, key, hf_sd), strict=True):
            params = {k: v for k, v in chunk.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
            if set(params) != set(local_sd):
                raise AssertionError(
                    f"parameter names differ: model only {sorted(set(params) - set(local_sd))}, "
                    f"converted only {sorted(set(local_sd) - set(params))}"
                )
            for name, param in params.items():
                ptr = param.data_ptr()
                param.data.copy_(local_sd[name])
                if param.data_ptr() != ptr:
                    raise AssertionError(f"{name} changed storage")
                updated += 1
    return {"rank": rank, "updated": updated}


def logits(state: dict, rank: int, world_size: int, *, key: str, tokens: list[list[int]]) -> torch.Tensor | None:
    """Logits `[batch, seq, vocab]` (vocab padding cut off) from TP rank 0 of the last stage; `None` elsewhere.

    With PP each stage runs its layers and hands the hidden states `[seq, batch, hidden]` to the same
    position of the next stage by point-to-point send / recv (no VPP).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    meta = state[f"{key}/meta"]
    if meta["vpp"] is not None:
        raise NotImplementedError("logits() does not run interleaved (VPP) schedules")
    layouts.ensure_model_parallel(*meta["layout"])
    model = state[key]
    ids = torch.tensor(tokens, dtype=torch.long)
    seq = ids.shape[1]
    position_ids = torch.arange(seq, dtype=torch.long).expand_as(ids)
    causal_mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with torch.no_grad():
        if not model.pre_process:
            hidden = torch.empty((seq, ids.shape[0], meta["case"].hidden_size), dtype=next(model.parameters()).dtype)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, position_ids, causal_mask, runtime_gather_output=True)
        if not model.post_process:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    if ps.get_tensor_model_parallel_rank() != 0:
        return None
    return out[..., : meta["case"].vocab_size].float().clone()


def drop(state: dict, rank: int, world_size: int, *, key: str) -> bool:
    """Forget the model stored under `key`, and free the layouts no stored model uses; True if there was one.

    Every rank runs it (the cluster runs each command on all ranks), so all ranks free the same groups.
    """
    state.pop(f"{key}/meta", None)
    dropped = state.pop(key, None) is not None
    layouts.free_unused_layouts(state)
    return dropped


# --- diagnostics for the harness's own tests ---------------------------------------------------


def ping(state: dict, rank: int, world_size: int) -> dict[str, Any]:
    """Who this worker is: process-group rank/size, pid, torch threads, stored keys."""
    import os

    import torch.distributed as dist

    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "keys": sorted(k for k in state if not k.startswith("_")),
    }


def resources(state: dict, rank: int, world_size: int) -> dict[str, Any]:
    """What this worker holds: OS threads (by name), its CPU seconds so far, live process groups, layouts."""
    import collections
    import os

    import torch.distributed as dist

    names: collections.Counter[str] = collections.Counter()
    cpu_by_name: collections.Counter[str] = collections.Counter()
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended while being listed
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        names[name] += 1
        cpu_by_name[name] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    times = os.times()
    return {
        "threads": sum(names.values()),
        "thread_names": dict(names),
        "thread_cpu_s": dict(cpu_by_name),
        "cpu_s": times.user + times.system,
        "process_groups": len(dist.distributed_c10d._world.pg_map),
        "layouts": sorted(layouts.LAYOUTS, key=str),
    }


def fail(state: dict, rank: int, world_size: int, *, ranks: list[int], message: str) -> int:
    """Raise `RuntimeError(message)` on `ranks`, return the rank elsewhere."""
    if rank in ranks:
        raise RuntimeError(message)
    return rank


def sleep(state: dict, rank: int, world_size: int, *, ranks: list[int], seconds: float) -> int:
    """Sleep on `ranks` (to simulate a hung rank), return the rank."""
    import time

    if rank in ranks:
        time.sleep(seconds)
    return rank
