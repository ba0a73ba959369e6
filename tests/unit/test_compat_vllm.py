"""Contract tests of `refit.compat.vllm`: every vLLM internal refit relies on, checked against the installed vLLM.

Each failure message names the installed vLLM version and the tested ones. `test_model_loading_*`
cover the model-loading section (layerwise reload, parameter classes, vocabulary layers) with real
vLLM layers on CPU, in a one-process world when a layer needs vLLM's tensor-parallel group.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from refit.compat import vllm as compat
from refit.plan.targets import DEFAULT_VOCAB_PADDING, EngineLayout


def _why(what: str) -> str:
    return f"vLLM {compat.version()} (refit is tested with {', '.join(compat.TESTED_VERSIONS)}): {what}"


@pytest.fixture
def world(tmp_path) -> Iterator[None]:
    """vLLM's distributed state for a world of one process (TP 1), created and destroyed around the test."""
    import torch.distributed as dist
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    assert not dist.is_initialized(), "another test left torch.distributed initialised"
    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(
            world_size=1, rank=0, distributed_init_method=f"file://{tmp_path}/store", local_rank=0, backend="gloo"
        )
        try:
            ps.initialize_model_parallel(1, 1)
            yield
        finally:
            ps.destroy_model_parallel()
            ps.destroy_distributed_environment()


class _Pair(torch.nn.Module):
    """A layer of two plain parameters: it is processed once both are loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(2, 3), requires_grad=False)
        self.b = torch.nn.Parameter(torch.ones(3), requires_grad=False)


def _tied_model() -> torch.nn.Module:
    """A vocabulary of 100 (padded to 128) whose output layer is tied to the embedding, and a `_Pair`."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm.model_executor.model_loader.reload import record_metadata_for_reloading

    model = torch.nn.Module()
    model.embed = VocabParallelEmbedding(100, 8)
    model.head = ParallelLMHead(100, 8).tie_weights(model.embed)
    model.pair = _Pair()
    with torch.no_grad():
        model.embed.weight.fill_(1.0)
    record_metadata_for_reloading(model)  # what vLLM's loader does once the model is built
    return model


def test_model_loading_version_is_a_tested_one() -> None:
    assert compat.version() in compat.TESTED_VERSIONS, _why("not a tested version")


def test_model_loading_default_vocab_padding_is_ours() -> None:
    assert compat.default_vocab_padding() == DEFAULT_VOCAB_PADDING == EngineLayout().vocab_padding, _why(
        "DEFAULT_VOCAB_PADDING_SIZE differs from refit's default vocabulary padding"
    )


def test_model_loading_layerwise_reload_of_a_tied_table_keeps_storage_and_zero_fills_padding(world) -> None:
    model = _tied_model()
    kernel = model.embed.weight
    assert model.head.weight is kernel
    assert compat.is_vocab_parallel(model.embed) and compat.is_vocab_parallel(model.head), _why(
        "VocabParallelEmbedding"
    )
    assert compat.vocab_padding(model.embed) == 64 and compat.vocab_rows(model.embed) == (0, 100), _why("vocab layer")
    params, buffers = compat.recorded_tensors(model.embed)
    assert set(params) == {"weight"} and params["weight"].is_meta and tuple(params["weight"].shape) == (128, 8), _why(
        "get_layerwise_info(module).restore_metadata"
    )
    assert buffers == {}

    rows = torch.arange(800, dtype=kernel.dtype).reshape(100, 8)
    compat.initialize_layerwise_reload(model)
    live = dict(model.named_parameters())
    # The adapter relies on this: during a reload each layer of a tied pair has its own parameter.
    assert live["embed.weight"] is not live["head.weight"], _why("layerwise reload no longer unties shared parameters")
    undo = [compat.load_vocab_rows_only(model.embed), compat.load_vocab_rows_only(model.head)]
    for name in ("embed.weight", "head.weight"):
        compat.weight_loader(live[name])(live[name], rows)
    for name, value in (("pair.a", torch.full((2, 3), 2.0)), ("pair.b", torch.full((3,), 3.0))):
        compat.weight_loader(live[name])(live[name], value)
    compat.finalize_layerwise_reload(model, SimpleNamespace(dtype=torch.float32))
    for restore in undo:
        restore()

    assert model.embed.weight is kernel and model.head.weight is kernel, _why("kernel tensors are not put back")
    assert torch.equal(kernel[:100], rows) and not kernel[100:].any(), _why("vocabulary rows or padding")
    assert compat.vocab_rows(model.embed) == (0, 100) and model.embed.org_vocab_size == 100
    assert torch.equal(model.pair.a, torch.full((2, 3), 2.0)) and torch.equal(model.pair.b, torch.full((3,), 3.0))


def test_model_loading_abandoned_layers_keep_their_old_values(world) -> None:
    model = _tied_model()
    a, b = model.pair.a, model.pair.b
    compat.initialize_layerwise_reload(model)
    live = dict(model.named_parameters())
    compat.weight_loader(live["pair.a"])(live["pair.a"], torch.full((2, 3), 2.0))  # b never comes: pair is pending
    assert compat.abandon_pending_layers(model) == ["pair"], _why("LayerReloadingInfo.load_numel / loaded_weights")
    compat.finalize_layerwise_reload(model, SimpleNamespace(dtype=torch.float32))
    assert model.pair.a is a and model.pair.b is b
    assert torch.equal(a, torch.ones(2, 3)) and torch.equal(b, torch.ones(3)), _why("an abandoned layer was processed")
    assert torch.equal(model.embed.weight, torch.ones(128, 8))


def test_model_loading_a_reload_of_some_modules_leaves_the_others_untouched(world) -> None:
    """What a streamed install of a chunk of layers relies on: a reload scoped to modules of the model."""
    model = _tied_model()
    a, b, table = model.pair.a, model.pair.b, model.embed.weight
    compat.initialize_layerwise_reload(model.pair)
    assert model.pair.a.is_meta and not model.embed.weight.is_meta, _why("a reload of one module reached another")
    assert model.embed.weight is table and model.head.weight is table
    live = dict(model.named_parameters())
    for name, value in (("pair.a", torch.full((2, 3), 2.0)), ("pair.b", torch.full((3,), 3.0))):
        compat.weight_loader(live[name])(live[name], value)
    compat.finalize_layerwise_reload(model.pair, SimpleNamespace(dtype=torch.float32))
    assert model.pair.a is a and model.pair.b is b, _why("kernel tensors are not put back")
    assert torch.equal(a, torch.full((2, 3), 2.0)) and torch.equal(b, torch.full((3,), 3.0))
    assert torch.equal(table, torch.ones(128, 8)) and compat.weight_loader(table).__name__ != "online_process_loader"
    # A module of the reload that is fed nothing gets its own tensors back, unchanged.
    compat.initialize_layerwise_reload(model.pair)
    compat.finalize_layerwise_reload(model.pair, SimpleNamespace(dtype=torch.float32))
    assert model.pair.a is a and torch.equal(a, torch.full((2, 3), 2.0)), _why("an unfed layer lost its weights")


def test_model_loading_vocab_loader_takes_only_the_rows_of_rank_1_of_2() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    with set_current_vllm_config(VllmConfig()):
        layer = VocabParallelEmbedding(100, 8, parallel_group=SimpleNamespace(rank_in_group=1, world_size=2))
    assert compat.vocab_rows(layer) == (64, 100), _why("VocabParallelEmbedding.shard_indices")
    param, rows = layer.weight, torch.arange(36 * 8, dtype=layer.weight.dtype).reshape(36, 8)
    param.data.fill_(7.0)
    restore = compat.load_vocab_rows_only(layer)
    compat.weight_loader(param)(param, rows)
    restore()
    assert torch.equal(param[:36], rows) and not param[36:].any(), _why("VocabParallelEmbedding.weight_loader")
    assert compat.vocab_rows(layer) == (64, 100) and layer.org_vocab_size == 100


def test_model_loading_plain_parameters_marked_sharded_are_not_sliced_again() -> None:
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    rank1 = SimpleNamespace(tp_rank=1)  # the loaders read only the layer's rank here
    full = torch.arange(16.0).reshape(4, 4)
    for loader, attr, dim in (
        (ColumnParallelLinear.weight_loader, "output_dim", 0),
        (RowParallelLinear.weight_loader, "input_dim", 1),
    ):
        param = torch.nn.Parameter(torch.zeros(full.narrow(dim, 0, 2).shape), requires_grad=False)
        setattr(param, attr, dim)
        loader(rank1, param, full)
        assert torch.equal(param, full.narrow(dim, 2, 2)), _why(f"{loader.__qualname__} slices at tp_rank * shard")
        undo = compat.mark_presharded(param)
        mine = torch.full(param.shape, 5.0)
        loader(rank1, param, mine)
        assert torch.equal(param, mine), _why(f"{loader.__qualname__} ignores is_sharded_weight")
        undo()
        assert not hasattr(param, "is_sharded_weight")
    for cls in (MergedColumnParallelLinear, QKVParallelLinear):
        assert "is_sharded_weight" in inspect.getsource(cls.weight_loader), _why(f"{cls.__name__}.weight_loader")


def test_model_loading_vllm_parameters_marked_sharded_load_as_rank_0_of_1(world) -> None:
    from vllm.model_executor.parameter import BasevLLMParameter, ModelWeightParameter

    param = ModelWeightParameter(data=torch.zeros(2, 3), input_dim=1, output_dim=0, weight_loader=lambda *a: None)
    assert isinstance(param, BasevLLMParameter), _why("ModelWeightParameter is a BasevLLMParameter")
    param.tp_rank, param.tp_size = 1, 2  # as rank 1 of 2 holds it
    full = torch.arange(12.0).reshape(4, 3)
    param.load_column_parallel_weight(full)
    assert torch.equal(param.data, full[2:]), _why("BasevLLMParameter slices at tp_rank * shard")
    undo = compat.mark_presharded(param)
    assert (param.tp_rank, param.tp_size) == (0, 1)
    param.load_column_parallel_weight(full[:2] + 100)
    assert torch.equal(param.data, full[:2] + 100), _why("BasevLLMParameter.tp_rank / tp_size")
    undo()
    assert (param.tp_rank, param.tp_size) == (1, 2)


def test_model_loading_weight_loader_defaults_to_vllms() -> None:
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    plain = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    assert compat.weight_loader(plain) is default_weight_loader, _why("default_weight_loader")
    plain.weight_loader = print  # type: ignore[attr-defined]
    assert compat.weight_loader(plain) is print


def test_model_loading_reload_leaves_late_biases_and_the_router_bias_in_place() -> None:
    """A `bias` created after the weights and DeepSeek's router `e_score_correction_bias` are never
    recorded, moved to meta or wrapped: the engine takes their live shapes and loads them once."""
    assert {"bias", "e_score_correction_bias"} <= compat.never_reloaded(), _why("reload.meta.SKIP_TENSORS")


# -- worker and weight-transfer internals (refit.vllm: backend, plugin, drivers) ------------------------------


def _worker_vllm_config(*, tp: int = 1, pp: int = 1) -> SimpleNamespace:
    from vllm.config import ParallelConfig

    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    return SimpleNamespace(parallel_config=parallel, model_config=SimpleNamespace(model="probe"))


def test_worker_weight_transfer_bases_are_what_the_backend_subclasses() -> None:
    from refit.vllm.backend import RefitInitInfo, RefitUpdateInfo, RefitWeightTransferEngine

    engine, init_info, update_info = compat.weight_transfer_bases()
    assert issubclass(RefitWeightTransferEngine, engine), _why("WeightTransferEngine")
    assert issubclass(RefitInitInfo, init_info) and issubclass(RefitUpdateInfo, update_info), _why(
        "WeightTransferInitInfo / WeightTransferUpdateInfo"
    )
    abstract = sorted(getattr(RefitWeightTransferEngine, "__abstractmethods__", ()))
    assert not abstract, _why(f"WeightTransferEngine's abstract methods (the refit backend lacks {abstract})")
    params = list(inspect.signature(engine.__init__).parameters)
    assert params == ["self", "config", "vllm_config", "device", "model"], _why(f"WeightTransferEngine{params}")


def test_worker_base_class_parses_infos_sets_the_target_and_calls_receive_weights() -> None:
    import contextlib

    from refit.vllm.backend import RefitInitInfo, RefitUpdateInfo
    from refit.vllm.flow import init_info

    engine, _, _ = compat.weight_transfer_bases()

    class Probe(engine):  # type: ignore[misc,valid-type]
        init_info_cls = RefitInitInfo
        update_info_cls = RefitUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, *args: object) -> None:
            super().__init__(*args)
            self.received: list[object] = []

        def init_transfer_engine(self, init_info: object) -> None: ...
        def start_weight_update(self) -> None: ...
        def finish_weight_update(self) -> None: ...
        def shutdown(self) -> None: ...

        def receive_weights(self, update_info: object) -> None:
            self.received.append(update_info)

    model, config, cpu = torch.nn.Linear(2, 2), _worker_vllm_config(), torch.device("cpu")
    probe = Probe(SimpleNamespace(backend="refit"), config, cpu, model)
    assert compat.update_target(probe) == (model, config.model_config, cpu), _why("WeightTransferEngine.model_config")
    parsed = probe.parse_init_info(init_info(catalog="c:1", name="n", catalog_timeout_s=3.0))
    assert parsed == RefitInitInfo(catalog="c:1", name="n", catalog_timeout_s=3.0), _why("init_info_cls")
    # update_weights synchronizes the accelerator after receive_weights; a CPU-only process has none.
    with contextlib.suppress(RuntimeError):
        probe.update_weights({"version": 3})
    assert probe.received == [RefitUpdateInfo(version=3)], _why("update_weights -> update_info_cls -> receive_weights")


def test_worker_collective_rpc_reaches_the_weight_transfer_engine_attribute() -> None:
    import ast
    import importlib.util
    from pathlib import Path

    from vllm.v1.serial_utils import run_method

    # The worker keeps its engine in that attribute (read from the source: importing the worker is slow).
    spec = importlib.util.find_spec("vllm.v1.worker.gpu_worker")
    assert spec is not None and spec.origin, _why("vllm.v1.worker.gpu_worker")
    tree = ast.parse(Path(spec.origin).read_text())
    workers = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Worker"]
    assert workers, _why("vllm.v1.worker.gpu_worker.Worker")
    assigned = {
        target.attr
        for node in ast.walk(workers[0])
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }
    assert compat.WEIGHT_TRANSFER_ATTR in assigned, _why(f"Worker.{compat.WEIGHT_TRANSFER_ATTR}")

    # collective_rpc runs a method named by a string as getattr(worker, name)(*args, **kwargs).
    class Engine:
        def __call__(self, op: str = "status", **kwargs: object) -> dict[str, object]:
            return {"op": op, **kwargs}

    worker = SimpleNamespace(**{compat.WEIGHT_TRANSFER_ATTR: Engine()})
    reply = run_method(worker, compat.WEIGHT_TRANSFER_ATTR, (), {"op": "prefetch", "version": 2})
    assert reply == {"op": "prefetch", "version": 2}, _why("collective_rpc by attribute name (run_method)")


def test_worker_tensor_parallel_rank_and_cpu_group(world) -> None:
    import torch.distributed as dist

    assert compat.tp_rank() == 0, _why("parallel_state.get_tensor_model_parallel_rank")
    group = compat.tp_cpu_group()
    assert dist.get_backend(group) == "gloo" and dist.get_world_size(group) == 1, _why("get_tp_group().cpu_group")
    mine, everyone = torch.tensor([7]), [torch.zeros(1, dtype=torch.int64)]
    dist.all_gather(everyone, mine, group=group)  # what the backend's TP agreement does over it
    assert everyone[0].item() == 7


def test_worker_parallel_config_sizes() -> None:
    assert compat.parallel_sizes(_worker_vllm_config(tp=2, pp=1)) == (2, 1), _why("ParallelConfig.*_parallel_size")


def test_worker_factory_registers_the_backend_once_and_creates_it() -> None:
    from vllm.config import WeightTransferConfig
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from refit.errors import ConfigError
    from refit.vllm.plugin import BACKEND

    compat.register_weight_transfer_engine(BACKEND, "refit.vllm.backend", "RefitWeightTransferEngine")
    again = compat.register_weight_transfer_engine(BACKEND, "refit.vllm.backend", "RefitWeightTransferEngine")
    assert again is False, _why("WeightTransferEngineFactory.register_engine refuses a second registration")
    # The factory resolves the name to the backend and builds it with (config, vllm_config, device, model):
    # the backend's own check of pipeline parallelism answers before it needs a TP group.
    with pytest.raises(ConfigError, match="tensor parallelism only"):
        WeightTransferEngineFactory.create_engine(
            WeightTransferConfig(backend=BACKEND), _worker_vllm_config(pp=2), torch.device("cpu"), torch.nn.Linear(2, 2)
        )


def test_worker_weight_transfer_requests() -> None:
    init = compat.init_request({"catalog": "c:1"})
    update = compat.update_request({"version": 2})
    assert init.init_info == {"catalog": "c:1"}, _why("WeightTransferInitRequest(init_info=...)")
    assert update.update_info == {"version": 2}, _why("WeightTransferUpdateRequest(update_info=...)")


def _routed_experts(*, tp_size: int) -> torch.nn.Module:
    """vLLM's fused expert layer of 4 experts (hidden 64, FFN 64 split over `tp_size`), bf16 (what CPU MoE runs)."""
    from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

    runner = FusedMoEFactory(
        num_experts=4, top_k=2, hidden_size=64, intermediate_size=64, tp_size=tp_size,
        prefix="model.layers.0.mlp.experts", params_dtype=torch.bfloat16,
    )  # fmt: skip
    experts = runner.routed_experts
    assert compat.is_routed_experts(experts) and not compat.is_routed_experts(runner), _why("RoutedExperts")
    return experts


def test_model_loading_expert_layout_without_expert_parallelism(world) -> None:
    experts = _routed_experts(tp_size=1)
    assert compat.expert_parallel(experts) == (0, 1), _why("FusedMoEParallelConfig.use_ep / ep_rank / ep_size")
    assert compat.local_experts(experts, 4) == [0, 1, 2, 3], _why("RoutedExperts global -> local expert ids")
    assert tuple(experts.w13_weight.shape) == (4, 128, 64) and tuple(experts.w2_weight.shape) == (4, 64, 64), _why(
        "RoutedExperts w13_weight [E, 2F, H] / w2_weight [E, H, F]"
    )
    assert set(compat.EXPERT_PARAMS.values()) == {n for n, _ in experts.named_parameters()}


def test_model_loading_expert_loader_marked_presharded_takes_the_rows_as_they_are(world) -> None:
    experts = _routed_experts(tp_size=2)  # FFN 64 over 2 ranks: each rank holds 32 rows of gate and of up
    parallel = experts.moe_config.moe_parallel_config
    parallel.tp_rank = 1  # as rank 1 of 2 holds it (the loader reads only these two fields)
    w13, w2, name = experts.w13_weight, experts.w2_weight, "model.layers.0.mlp.experts.w13_weight"
    full = torch.arange(64 * 64, dtype=torch.bfloat16).reshape(64, 64)
    assert compat.load_expert(w13, full, weight_name=name, shard="w1", expert=2)
    assert torch.equal(w13[2, :32], full[32:]), _why("RoutedExperts.weight_loader slices gate rows at tp_rank * F/tp")

    undo = compat.load_experts_presharded(experts)
    assert (parallel.tp_rank, parallel.tp_size) == (0, 1)
    gate, up, down = (torch.full(shape, v, dtype=torch.bfloat16) for shape, v in (((32, 64), 5.0), ((32, 64), 6.0),
                                                                                   ((64, 32), 7.0)))  # fmt: skip
    assert compat.load_expert(w13, gate, weight_name=name, shard="w1", expert=3)
    assert compat.load_expert(w13, up, weight_name=name, shard="w3", expert=3)
    assert compat.load_expert(w2, down, weight_name=name.replace("w13", "w2"), shard="w2", expert=1)
    undo()
    assert (parallel.tp_rank, parallel.tp_size) == (1, 2)
    assert torch.equal(w13[3, :32], gate) and torch.equal(w13[3, 32:], up), _why("w13 holds gate (w1) then up (w3)")
    assert torch.equal(w2[1], down), _why("w2 holds the rank's columns of down_proj")
    assert torch.equal(w13[2, :32], full[32:]), "another expert's slot was written"


def test_model_loading_moe_kernel_is_dropped_for_a_reload_and_put_back_if_unprocessed(world) -> None:
    experts = _routed_experts(tp_size=1)
    method = experts.quant_method
    # The defect worked around: with a kernel, processing is a weight update that skips the experts' own step.
    source = inspect.getsource(type(method)._setup_kernel)
    assert "self.moe_kernel is not None" in source and "process_weights_after_loading" in source, _why(
        "UnquantizedFusedMoEMethod._setup_kernel (check whether vLLM still skips the experts' post-load step)"
    )
    method.moe_kernel = old = object()
    undo = compat.redo_expert_processing(experts)
    assert method.moe_kernel is None
    undo()  # not processed meanwhile (an abandoned load): the old kernel is back
    assert method.moe_kernel is old
    undo = compat.redo_expert_processing(experts)
    method.moe_kernel = new = object()  # what processing the layer does
    undo()
    assert method.moe_kernel is new
