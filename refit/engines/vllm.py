"""`VLLMEngine`: one vLLM worker's model (one engine TP rank) as a refit `Engine`.

The rank's tensors are the Hugging Face tensors of vLLM's tensor-parallel convention, already sliced
for this rank. Their names and shapes are the planner's own targets (`refit.plan.shapes`) at this
rank's layout, checked once against the shapes vLLM recorded when it built the model.

`install` loads a complete set through vLLM's layerwise reload: every layer is rebuilt from the
metadata vLLM recorded at start-up, the rank-local slices go through each parameter's own weight
loader (told that they are this rank's slice already, so it does not slice again), vLLM re-runs its
post-load processing (the CPU backend repacks every linear layer there), and the results are copied
into the original kernel tensors, so parameter storage is kept (CUDA graphs stay valid). Fused
parameters are always loaded whole (q, k and v together; gate and up together): a partial load would
leave the rest uninitialized. A parameter shared by several layers (tied embeddings: the output
layer reads the embedding table) is loaded into every one of them, so each is processed again.
Every vLLM internal used here goes through `refit.compat.vllm`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from refit.compat import vllm as compat
from refit.dtypes import dtype_name
from refit.engines.base import EngineSpec, TensorSpec, check_install, spec_from_hf_config
from refit.errors import ConfigError, ModelMismatchError
from refit.plan.naming import architecture_from_hf
from refit.plan.shapes import dense_targets
from refit.plan.targets import Target
from refit.types import ModelMeta

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

    What `install` guarantees:

    - A refused install changes nothing. Before the reload starts, every tensor is checked: exactly
      this rank's names, each with its shape and dtype, a dense tensor with storage (not on the meta
      device) on the CPU or on the engine's device type. The loaders can then only fail for reasons
      outside the input (out of memory, a vLLM defect).
    - A successful install leaves every parameter and buffer in its original storage, holding the new
      values, and re-runs vLLM's post-load processing of every layer it loads (tied output layers too).
    - If loading fails part-way anyway, the model is not rolled back (re-loading the old values would
      need a copy of them): the layers processed before the failure hold the new weights and every
      other layer keeps its old ones, each layer whole (loads buffered for layers not yet processed
      are dropped rather than processed with rows missing). Storage is kept either way. The engine is
      then serving a mix of two versions and should be refitted again before it is trusted. Not
      covered: a failure inside vLLM's own finalization (it processes the layers still pending).

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
        self._vocab_modules = {n: m for n, m in model.named_modules() if compat.is_vocab_parallel(m)}
        self._spec = spec_from_hf_config(
            self._cfg,
            architecture=self._architecture,
            tp_rank=tp_rank,
            tp_size=tp_size,
            vocab_padding=self._vocab_padding(),
        )
        self._layout = self._spec.layout()
        self._targets = dense_targets(self._model_meta(), self._layout)
        self._check_against_model()
        self._expected = {name: TensorSpec(shape=t.shape, dtype=t.dtype) for name, t in self._targets.items()}
        self._aliases = _aliases(model)

    # -- the Engine protocol -------------------------------------------------------------------------

    def spec(self) -> EngineSpec:
        return self._spec

    def expected(self) -> dict[str, TensorSpec]:
        return dict(self._expected)

    @property
    def device(self) -> torch.device:
        return self._device

    def install(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load a complete, validated set of this rank's tensors (see the class docstring)."""
        self._validate(tensors)
        # A shared parameter's other layers load right after it: no other layer's failure falls between them.
        loads = [
            (param, shard, tensors[name])
            for name in sorted(tensors, key=_layer_order)
            for target, shard in [vllm_target(name)]
            for param in (target, *self._aliases.get(target, ()))
        ]
        compat.initialize_layerwise_reload(self.model)
        undo: list[Callable[[], None]] = []
        loaded = False
        try:
            params = dict(self.model.named_parameters())  # reload gives tied layers a parameter each
            marked: set[str] = set()
            for target, shard, tensor in loads:
                param = params[target]
                if target not in marked:
                    marked.add(target)
                    module = self._vocab_modules.get(target.rpartition(".")[0])
                    undo.append(compat.load_vocab_rows_only(module) if module else compat.mark_presharded(param))
                loader = compat.weight_loader(param)
                if shard is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard)
            loaded = True
        finally:
            try:
                if not loaded:
                    dropped = compat.abandon_pending_layers(self.model)
                    logger.error("vLLM install failed part-way; pending layers dropped, kept old: %s", dropped)
                compat.finalize_layerwise_reload(self.model, self.model_config)
            finally:
                for restore in reversed(undo):
                    restore()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    # -- helpers ---------------------------------------------------------------------------------------

    def _vocab_padding(self) -> int:
        paddings = {compat.vocab_padding(m) for m in self._vocab_modules.values()}
        if len(paddings) > 1:
            raise ModelMismatchError(f"vLLM vocabulary layers pad differently ({sorted(paddings)}); not supported")
        return paddings.pop() if paddings else compat.default_vocab_padding()

    def _model_meta(self) -> ModelMeta:
        """The model as the planner sees it, from vLLM's config (the trainer's padding does not matter here)."""
        s = self.spec()
        padding = self._layout.vocab_padding
        return ModelMeta(
            architecture=s.architecture,
            num_layers=s.num_layers,
            hidden_size=s.hidden_size,
            num_attention_heads=s.num_attention_heads,
            num_query_groups=s.num_query_groups,
            kv_channels=s.kv_channels,
            ffn_hidden_size=s.ffn_hidden_size,
            padded_vocab_size=math.ceil(s.vocab_size / padding) * padding,
            vocab_size=s.vocab_size,
            tied_embeddings=s.tied_embeddings,
            qkv_bias=self._architecture == "qwen2" or bool(getattr(self._cfg, "attention_bias", False)),
            qk_layernorm=self._architecture == "qwen3",
            params_dtype=dtype_name(self.model_config.dtype),
        )

    def _check_against_model(self) -> None:
        """Every vLLM parameter must be fed, with exactly the rows it holds (as recorded at load time)."""
        recorded = _recorded_shapes(self.model)
        fed: dict[str, int] = {}
        for name, target in self._targets.items():
            param, _ = vllm_target(name)
            fed[param] = fed.get(param, 0) + target.shape[0]
        problems = [f"{n}: not in the vLLM model" for n in sorted(set(fed) - set(recorded))]
        for name, shape in recorded.items():
            rows = fed.get(name)
            module = self._vocab_modules.get(name.rpartition(".")[0])
            if rows is None:
                problems.append(f"{name}: no HF tensor feeds it")
            elif module is not None:
                problems += _vocab_problems(name, self._targets[name], compat.vocab_rows(module), shape[0])
            elif rows != shape[0]:
                problems.append(f"{name}: {shape[0]} rows in vLLM, {rows} from the HF tensors")
        if problems:
            raise ModelMismatchError("vLLM model does not match its config's layout: " + "; ".join(problems[:8]))

    def _validate(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_install(self._expected, tensors)
        for name, t in tensors.items():
            if t.is_meta or t.layout != torch.strided:
                raise ModelMismatchError(f"{name}: a {t.layout} tensor on {t.device} holds no loadable data")
            if t.device.type not in ("cpu", self._device.type):
                raise ModelMismatchError(f"{name}: on {t.device}; the engine loads from cpu or {self._device.type}")


def _vocab_problems(name: str, target: Target, held: tuple[int, int], table_rows: int) -> list[str]:
    """The rows of the real vocabulary vLLM's layer holds must be exactly the target's rows."""
    start, stop = held
    rows = target.rows[0] if target.rows else (start, start)
    if stop - start != rows[1] - rows[0] or (stop > start and rows[0] != start) or stop - start > table_rows:
        return [f"{name}: vLLM holds vocabulary rows [{start}, {stop}), the plan gives [{rows[0]}, {rows[1]})"]
    return []


def _aliases(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter name -> the other names of the same parameter (a tied output layer's `lm_head.weight`).

    Layerwise reload gives every layer its own parameter and processes only the layers it loaded
    (vLLM's documented limitation), so a tied layer fed nothing would keep what its processing
    derived from the old values (on CPU: the output layer's packed copy of the embedding table).
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {n: tuple(o for o in group if o != n) for group in names.values() if len(group) > 1 for n in group}


def _recorded_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes as vLLM created them (before CPU repacking emptied some), by full name."""
    live = dict(model.named_parameters())  # shared parameters (a tied lm_head) appear once
    out: dict[str, tuple[int, ...]] = {}
    for prefix, module in model.named_modules():
        params, _ = compat.recorded_tensors(module)
        bias = getattr(module, "bias", None)  # created after the recorded weights: never in the metadata
        own = {**params, **({"bias": bias} if isinstance(bias, torch.nn.Parameter) else {})}
        for name, tensor in own.items():
            full = f"{prefix}.{name}" if prefix else name
            if full in live:
                out[full] = tuple(tensor.shape)
    return out


def _layer_order(name: str) -> tuple[int, str]:
    """Embeddings first, then layer by layer (so at most one layer is materialized at a time), then the rest."""
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) + 1, name
    return (0 if "embed" in name else 1 << 30), name
