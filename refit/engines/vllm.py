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

`install_layers` loads the complete tensors of some layers only (`layer_of`: a decoder layer, or a
module outside them, modules sharing a parameter together) through a layerwise reload of just those
modules; the receiver streams a rank's weights larger than its staging window that way, chunk by chunk.

MoE models (Qwen3-MoE, Qwen2-MoE, Mixtral): routed experts arrive under the per-expert HF names
(`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`) and go through the loader of vLLM's
fused expert layer (`w13_weight` `[E, 2F/tp, H]`: gate as shard w1, up as w3; `w2_weight`
`[E, H, F/tp]` as w2), all experts of a layer in one pass, so the layer is processed once. Mixtral's
MoE block is `block_sparse_moe` in vLLM (the router too). Without expert parallelism vLLM splits
every expert's FFN by the engine TP, which is the planner's default `EngineLayout.expert_tp`; with it
(`enable_expert_parallel`) a rank holds whole experts of its EP rank, which the engine reads from
vLLM's layers. Every vLLM internal used here goes through `refit.compat.vllm`.

DeepSeek-V3 (multi-latent attention): `q_a_proj` and `kv_a_proj_with_mqa` load whole into vLLM's
replicated `fused_qkv_a_proj` (shards 0 and 1; without a query latent `kv_a_proj_with_mqa` is a layer of
its own and `q_proj` is not fused). `kv_b_proj` loads as it is; vLLM's MLA attention layer derives its
absorbed `W_UK_T` / `W_UV` from it when the reload is finalized (attention layers are always
re-processed then), so they are never fed. The router's fp32 `e_score_correction_bias` is a parameter
that layerwise reload never moves to the meta device (it is shared with the expert layer): its loader
writes it into its storage directly.
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
from refit.engines.vllm_model import (
    aliases,
    expert_problems,
    layer_order,
    layer_prefix,
    num_experts,
    recorded_shapes,
    reload_root,
    root_order,
    routed_experts,
    shared_expert_ffn,
    targets,
    vocab_problems,
)
from refit.engines.vllm_names import ExpertLoad, expert_target, fused_projections, vllm_target
from refit.errors import ConfigError, EngineError, ModelMismatchError
from refit.plan.naming import architecture_from_hf
from refit.plan.targets import Target
from refit.types import MLA_FIELDS, ModelMeta

logger = logging.getLogger(__name__)


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
      are dropped rather than processed with rows missing; DeepSeek's router bias, which the reload
      leaves in place, is written when it is loaded). Storage is kept either way. The engine is
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
        self._fused = fused_projections(self._architecture, (n for n, _ in model.named_parameters()))
        self._vocab_modules = {n: m for n, m in model.named_modules() if compat.is_vocab_parallel(m)}
        self._expert_modules = routed_experts(model) if num_experts(self._cfg) else {}
        # decoder layer prefix (`model.layers.3`) -> its routed-experts layer's name
        self._experts = {layer_prefix(n): n for n in self._expert_modules}
        ep_rank, ep_size = self._expert_parallel()
        self._spec = spec_from_hf_config(
            self._cfg,
            architecture=self._architecture,
            tp_rank=tp_rank,
            tp_size=tp_size,
            ep_rank=ep_rank,
            ep_size=ep_size,
            vocab_padding=self._vocab_padding(),
        )
        self._layout = self._spec.layout()
        self.targets = targets(self._model_meta(), self._layout, self._moe_layers(), shared_expert_ffn(self._cfg))
        self._check_against_model()
        self._expected = {name: TensorSpec(shape=t.shape, dtype=t.dtype) for name, t in self.targets.items()}
        self.aliases = aliases(model)
        self._members: dict[str, list[str]] | None = None

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
        self._install(tensors, roots=None)

    def layer_of(self, name: str) -> tuple[int, str]:
        """The layer tensor `name` installs into, as (order, name), for streaming whole layers.

        A decoder layer (`model.layers.3`: attention, MLP or experts, norms), or the module of a
        tensor outside the decoder layers (`model.embed_tokens`, `model.norm`, `lm_head`). A
        parameter shared by several modules makes them one layer (a tied embedding table:
        `lm_head+model.embed_tokens`), so every name of it is loaded in the same install.
        """
        if name not in self._expected:
            raise ModelMismatchError(f"{name}: not a tensor of this vLLM rank")
        roots = sorted({reload_root(param) for param in self._params_of(name)})
        return min(root_order(r) for r in roots), "+".join(roots)

    def install_layers(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load every tensor of some layers (`layer_of`) through a layerwise reload of those layers only.

        The other layers are not touched: they keep their weights, storage and processed state. Each
        layer given must be complete (vLLM processes a layer once all of it is loaded); the set is
        validated as `install` validates a whole one before anything is loaded. The guarantees of
        `install` hold for the layers given.
        """
        members = self._layer_members()
        layers = {self.layer_of(name)[1] for name in tensors}
        wanted = {name for layer in layers for name in members[layer]}
        check_install({n: self._expected[n] for n in wanted}, tensors)
        self._check_readable(tensors)
        self._install(tensors, roots=sorted(r for layer in layers for r in layer.split("+")))

    def _install(self, tensors: Mapping[str, torch.Tensor], *, roots: list[str] | None) -> None:
        """Load validated `tensors` in a layerwise reload of the whole model (`roots` None) or of the
        modules named in `roots` only."""
        # A shared parameter's other layers load right after it: no other layer's failure falls between them.
        # Layer by layer, so all experts of a MoE layer load together and the layer is processed once.
        loads: list[tuple[str, str | int | ExpertLoad | None, torch.Tensor]] = []
        for name in sorted(tensors, key=layer_order):
            expert = expert_target(name, self._experts)
            if expert is not None:
                loads.append((expert.param, expert, tensors[name]))
                continue
            target, shard = vllm_target(name, self._architecture, self._fused)
            loads += [(param, shard, tensors[name]) for param in (target, *self.aliases.get(target, ()))]
        if roots is None:
            modules, experts = [self.model], list(self._expert_modules.values())
        else:
            modules = [self.model.get_submodule(r) for r in roots]
            experts = [m for n, m in self._expert_modules.items() if reload_root(f"{n}.w") in roots]
        undo: list[Callable[[], None]] = []
        try:
            # Before the reload starts: a refusal here has changed nothing.
            for module in experts:
                undo.append(compat.load_experts_presharded(module))
                if self._device.type == "cpu":  # vLLM skips the CPU experts' padding and prepacking on a reload
                    undo.append(compat.redo_expert_processing(module))
            for module in modules:  # a reload of a module covers its submodules and nothing else
                compat.initialize_layerwise_reload(module)
            loaded = False
            try:
                self._load(loads, undo)
                loaded = True
            finally:
                if not loaded:
                    dropped = [d for module in modules for d in compat.abandon_pending_layers(module)]
                    logger.error("vLLM install failed part-way; pending layers dropped, kept old: %s", dropped)
                for module in modules:
                    compat.finalize_layerwise_reload(module, self.model_config)
        finally:
            for restore in reversed(undo):
                restore()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    # -- helpers ---------------------------------------------------------------------------------------

    def _load(
        self, loads: list[tuple[str, str | int | ExpertLoad | None, torch.Tensor]], undo: list[Callable[[], None]]
    ) -> None:
        """Feed every load to its parameter's loader (inside a layerwise reload; `undo` collects the restores)."""
        params = dict(self.model.named_parameters())  # reload gives tied layers a parameter each
        marked: set[str] = set()
        for target, shard, tensor in loads:
            param = params[target]
            if isinstance(shard, ExpertLoad):
                if not compat.load_expert(param, tensor, weight_name=target, shard=shard.shard, expert=shard.expert):
                    raise EngineError(f"{target}: vLLM's expert loader did not take expert {shard.expert}")
                continue
            if target not in marked:
                marked.add(target)
                module = self._vocab_modules.get(target.rpartition(".")[0])
                undo.append(compat.load_vocab_rows_only(module) if module else compat.mark_presharded(param))
            loader = compat.weight_loader(param)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)

    def _expert_parallel(self) -> tuple[int, int]:
        """(EP rank, EP size) of this worker's expert layers, which vLLM sets up (`enable_expert_parallel`)."""
        found = {compat.expert_parallel(m) for m in self._expert_modules.values()}
        if len(found) > 1:
            raise ModelMismatchError(f"vLLM expert layers disagree on their expert parallelism: {sorted(found)}")
        for module in self._expert_modules.values():
            compat.load_experts_presharded(module)()  # refuses layers whose experts it cannot load pre-sharded
        return found.pop() if found else (0, 1)

    def _moe_layers(self) -> frozenset[int]:
        """Decoder layers with routed experts, as vLLM built them (the config's sparse step and dense layers)."""
        if num_experts(self._cfg) and not self._experts:
            raise ModelMismatchError(f"{self._architecture}: the config has experts, but vLLM built no expert layers")
        return frozenset(int(p.rpartition(".")[2]) for p in self._experts)

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
            qkv_bias=self._architecture in ("qwen2", "qwen2_moe") or bool(getattr(self._cfg, "attention_bias", False)),
            qk_layernorm=self._architecture in ("qwen3", "qwen3_moe"),  # MLA's latent norms are not these
            num_experts=s.num_experts,
            moe_ffn_hidden_size=s.moe_ffn_hidden_size,
            params_dtype=dtype_name(self.model_config.dtype),
            **{f: getattr(s, f) for f in MLA_FIELDS},
        )

    def _check_against_model(self) -> None:
        """Every vLLM parameter must be fed, with exactly the rows it holds (as recorded at load time)."""
        recorded = recorded_shapes(self.model)
        fed: dict[str, int] = {}
        experts: dict[str, list[tuple[ExpertLoad, Target]]] = {}
        for name, target in self.targets.items():
            load = expert_target(name, self._experts)
            if load is not None:
                experts.setdefault(load.param, []).append((load, target))
                continue
            param, _ = vllm_target(name, self._architecture, self._fused)
            fed[param] = fed.get(param, 0) + target.shape[0]
        problems = [f"{n}: not in the vLLM model" for n in sorted((set(fed) | set(experts)) - set(recorded))]
        for name, shape in recorded.items():
            rows = fed.get(name)
            module = self._vocab_modules.get(name.rpartition(".")[0])
            if name in experts:
                held = compat.local_experts(self._expert_modules[experts[name][0][0].module], self._spec.num_experts)
                problems += expert_problems(name, shape, held, experts[name])
            elif rows is None:
                problems.append(f"{name}: no HF tensor feeds it")
            elif module is not None:
                problems += vocab_problems(name, self.targets[name], compat.vocab_rows(module), shape[0])
            elif rows != shape[0]:
                problems.append(f"{name}: {shape[0]} rows in vLLM, {rows} from the HF tensors")
        if problems:
            raise ModelMismatchError("vLLM model does not match its config's layout: " + "; ".join(problems[:8]))

    def _params_of(self, name: str) -> tuple[str, ...]:
        """The vLLM parameters HF tensor `name` loads into (a shared parameter under each of its names)."""
        expert = expert_target(name, self._experts)
        if expert is not None:
            return (expert.param,)
        target, _ = vllm_target(name, self._architecture)
        return (target, *self.aliases.get(target, ()))

    def _layer_members(self) -> dict[str, list[str]]:
        """Layer name (`layer_of`) -> every tensor name of that layer."""
        if self._members is None:
            members: dict[str, list[str]] = {}
            for name in self._expected:
                members.setdefault(self.layer_of(name)[1], []).append(name)
            self._members = members
        return self._members

    def _validate(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_install(self._expected, tensors)
        self._check_readable(tensors)

    def _check_readable(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if t.is_meta or t.layout != torch.strided:
                raise ModelMismatchError(f"{name}: a {t.layout} tensor on {t.device} holds no loadable data")
            if t.device.type not in ("cpu", self._device.type):
                raise ModelMismatchError(f"{name}: on {t.device}; the engine loads from cpu or {self._device.type}")
