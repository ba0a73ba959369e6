"""`VLLMEngine`: one vLLM worker's model (one engine TP rank) as a refit `Engine`.

The rank's tensors are the Hugging Face tensors of vLLM's tensor-parallel convention, already sliced
for this rank (`refit.plan.targets` computes the same slices on the pull side). `install` loads a
complete set through vLLM's layerwise reload: every layer is rebuilt from the metadata vLLM recorded
at start-up, the rank-local slices go through each parameter's own weight loader (marked as already
sharded, so the loader does not slice again), vLLM re-runs its post-load processing (the CPU backend
repacks every linear layer there), and the results are copied into the original kernel tensors, so
parameter storage is kept (CUDA graphs stay valid). Fused parameters are always loaded whole
(q, k and v together; gate and up together): a partial load would leave the rest uninitialized.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from refit.dtypes import dtype_name
from refit.engines.base import EngineSpec, TensorSpec, check_install, spec_from_hf_config
from refit.errors import ConfigError, ModelMismatchError
from refit.plan.naming import architecture_from_hf
from refit.plan.targets import VOCAB_PADDING

logger = logging.getLogger(__name__)

# HF projection -> (vLLM fused parameter, shard id), as vLLM's Llama/Qwen2/Qwen3 `load_weights` map them.
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def vllm_target(hf_name: str) -> tuple[str, str | int | None]:
    """The vLLM parameter an HF tensor loads into, and the shard id its weight loader takes."""
    parts = hf_name.split(".")
    if len(parts) >= 2 and parts[-2] in _FUSED:
        fused, shard = _FUSED[parts[-2]]
        return ".".join([*parts[:-2], fused, parts[-1]]), shard
    return hf_name, None


class VLLMEngine:
    """The model of one vLLM worker, refitted in place through layerwise reload.

    Args:
        model: the worker's `nn.Module` (what the weight-transfer engine is given).
        model_config: vLLM's `ModelConfig` (its `hf_config` and `dtype` describe the model).
        tp_rank, tp_size: this worker's place in the engine's tensor-parallel group.
        device: where staging memory lives (the worker's device).
    """

    def __init__(
        self, *, model: torch.nn.Module, model_config: Any, tp_rank: int, tp_size: int, device: torch.device
    ) -> None:
        if not 0 <= tp_rank < tp_size:
            raise ConfigError(f"tp_rank {tp_rank} is not in [0, {tp_size})")
        self.model = model
        self.model_config = model_config
        self._cfg = model_config.hf_config
        self._device = torch.device(device)
        self._tp_rank, self._tp_size = tp_rank, tp_size
        arch = (getattr(self._cfg, "architectures", None) or ["?"])[0]
        self._architecture = architecture_from_hf(arch)
        self._expected = self._compute_expected()

    # -- the Engine protocol -------------------------------------------------------------------------

    def spec(self) -> EngineSpec:
        return spec_from_hf_config(
            self._cfg, architecture=self._architecture, tp_rank=self._tp_rank, tp_size=self._tp_size
        )

    def expected(self) -> dict[str, TensorSpec]:
        return dict(self._expected)

    @property
    def device(self) -> torch.device:
        return self._device

    def install(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load a complete, validated set of this rank's tensors; nothing is touched on refusal."""
        self._validate(tensors)
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        initialize_layerwise_reload(self.model)
        params = dict(self.model.named_parameters())
        saved: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
        try:
            for name in sorted(tensors, key=_layer_order):
                target, shard = vllm_target(name)
                param = params[target]
                if id(param) not in saved:
                    saved[id(param)] = (param, _mark_presharded(param))
                tensor = tensors[name]
                if _is_vocab_parallel(self.model, target):
                    tensor = self._vocab_view(tensor)
                loader = getattr(param, "weight_loader", default_weight_loader)
                if shard is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard)
        finally:
            finalize_layerwise_reload(self.model, self.model_config)
            for param, old in saved.values():
                _restore_attrs(param, old)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    # -- helpers ---------------------------------------------------------------------------------------

    def _vocab_rows(self) -> tuple[int, int]:
        vocab = self._cfg.vocab_size
        padded = math.ceil(vocab / VOCAB_PADDING) * VOCAB_PADDING
        if padded % self._tp_size:
            raise ModelMismatchError(f"padded vocabulary {padded} is not divisible by engine TP size {self._tp_size}")
        per = padded // self._tp_size
        start = self._tp_rank * per
        return start, max(start, min(vocab, start + per))

    def _vocab_view(self, rows: torch.Tensor) -> torch.Tensor:
        """A full-vocabulary tensor whose rows of this rank are `rows`.

        vLLM's vocab-parallel loader takes the whole table and cuts the rank's rows itself. The other
        rows are never read: `torch.empty` of that size is not touched outside the rank's rows.
        """
        start, _ = self._vocab_rows()
        full = torch.empty((self._cfg.vocab_size, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        full[start : start + rows.shape[0]].copy_(rows)
        return full

    def _compute_expected(self) -> dict[str, TensorSpec]:
        s = self.spec()
        tp, dt = self._tp_size, dtype_name(self.model_config.dtype)
        for what, n in (("num_attention_heads", s.num_attention_heads), ("intermediate_size", s.ffn_hidden_size)):
            if n % tp:
                raise ModelMismatchError(f"{what} ({n}) is not divisible by engine TP size {tp}")
        if tp > s.num_query_groups and tp % s.num_query_groups:
            raise ModelMismatchError(f"engine TP size {tp} is neither a divisor nor a multiple of the KV heads")
        d, h = s.kv_channels, s.hidden_size
        q_rows, kv_rows, f = (
            s.num_attention_heads // tp * d,
            max(1, s.num_query_groups // tp) * d,
            s.ffn_hidden_size // tp,
        )
        start, end = self._vocab_rows()
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (end - start, h), "model.norm.weight": (h,)}
        if not s.tied_embeddings:
            out["lm_head.weight"] = (end - start, h)
        qkv_bias = self._architecture == "qwen2" or bool(getattr(self._cfg, "attention_bias", False))
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            out.update(
                {
                    p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q_rows, h),
                    p + "self_attn.k_proj.weight": (kv_rows, h),
                    p + "self_attn.v_proj.weight": (kv_rows, h),
                    p + "self_attn.o_proj.weight": (h, q_rows),
                    p + "mlp.gate_proj.weight": (f, h),
                    p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f),
                }
            )
            if qkv_bias:
                out.update({p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,)})
                out[p + "self_attn.v_proj.bias"] = (kv_rows,)
            if self._architecture == "qwen3":
                out.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        self._check_against_model(out)
        return {name: TensorSpec(shape=shape, dtype=dt) for name, shape in out.items()}

    def _check_against_model(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Every vLLM parameter must be fed, with exactly the rows it holds (as recorded at load time)."""
        recorded = _recorded_shapes(self.model)
        fed: dict[str, int] = {}
        for name, shape in shapes.items():
            target, _ = vllm_target(name)
            fed[target] = fed.get(target, 0) + shape[0]
        problems = [f"{n}: not in the vLLM model" for n in sorted(set(fed) - set(recorded))]
        for name, shape in recorded.items():
            rows = fed.get(name)
            if rows is None:
                problems.append(f"{name}: no HF tensor feeds it")
            elif rows != shape[0] and not (_is_vocab_parallel(self.model, name) and rows <= shape[0]):
                problems.append(f"{name}: {shape[0]} rows in vLLM, {rows} from the HF tensors")
        if problems:
            raise ModelMismatchError("vLLM model does not match its config's layout: " + "; ".join(problems[:8]))

    def _validate(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_install(self._expected, tensors)


_MISSING = object()


def _mark_presharded(param: torch.Tensor) -> dict[str, Any]:
    """Make vLLM's loaders take `param`'s data as this rank's slice already; returns what to restore.

    Plain parameters honour `is_sharded_weight`; vLLM's parameter classes (`BasevLLMParameter`) slice
    at `param.tp_rank * shard`, so they are loaded as rank 0 of 1, which slices nothing.
    """
    from vllm.model_executor.parameter import BasevLLMParameter

    names = ("tp_rank", "tp_size") if isinstance(param, BasevLLMParameter) else ("is_sharded_weight",)
    old = {n: getattr(param, n, _MISSING) for n in names}
    if isinstance(param, BasevLLMParameter):
        param.tp_rank, param.tp_size = 0, 1
    else:
        param.is_sharded_weight = True
    return old


def _restore_attrs(param: torch.Tensor, old: dict[str, Any]) -> None:
    for name, value in old.items():
        if value is _MISSING:
            delattr(param, name)
        else:
            setattr(param, name, value)


def _recorded_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes as vLLM created them (before CPU repacking emptied some), by full name."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    live = dict(model.named_parameters())  # shared parameters (a tied lm_head) appear once
    out: dict[str, tuple[int, ...]] = {}
    for prefix, module in model.named_modules():
        params, _ = get_layerwise_info(module).restore_metadata
        bias = getattr(module, "bias", None)  # created after the recorded weights: never in the metadata
        own = {**params, **({"bias": bias} if isinstance(bias, torch.nn.Parameter) else {})}
        for name, tensor in own.items():
            full = f"{prefix}.{name}" if prefix else name
            if full in live:
                out[full] = tuple(tensor.shape)
    return out


def _is_vocab_parallel(model: torch.nn.Module, param_name: str) -> bool:
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    module_name = param_name.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(module_name), VocabParallelEmbedding)
    except AttributeError:
        return False


def _layer_order(name: str) -> tuple[int, str]:
    """Embeddings first, then layer by layer (so at most one layer is materialized at a time), then the rest."""
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) + 1, name
    return (0 if "embed" in name else 1 << 30), name
