"""Contract tests of `refit.compat.megatron`: every megatron-core internal refit relies on, checked
against the installed megatron-core.

The checks go through `mcore.require`, so when an upgrade moves an internal the failure names the
installed version and the tested ones. Models are real megatron-core GPTModels built on CPU in a
single-process gloo world (created and destroyed around each test).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import pytest
import torch

from refit.compat import megatron as mcore
from refit.errors import ConfigError, DependencyError, LayoutError
from refit.megatron import model as reader
from refit.types import ParallelCoords, Role
from tests.support import hf_models as hm

CASE = hm.LLAMA_GQA
VOCAB = hm.padded_vocab(CASE, 1)  # padded vocabulary at TP 1


@pytest.fixture
def world() -> Iterator[None]:
    """A torch.distributed world of one process with Megatron's parallel state (TP = PP = 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    assert not dist.is_initialized(), "another test left torch.distributed initialised"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def gpt_model(**overrides: Any) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from tests.support.trainer_ops import transformer_config

    config = transformer_config(CASE, tp=1, pp=1, vpp=None, params_dtype=torch.float32)
    config = dataclasses.replace(config, **overrides)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=64,
        position_embedding_type="rope",
    )


def test_version_names_the_installed_and_tested_versions() -> None:
    assert mcore.version() == metadata.version("megatron-core")
    assert mcore.TESTED_VERSIONS
    mcore.require(True, "nothing")
    with pytest.raises(DependencyError) as err:
        mcore.require(False, "parallel_state.get_everything")
    message = str(err.value)
    assert f"megatron-core {mcore.version()}" in message
    assert all(v in message for v in mcore.TESTED_VERSIONS)
    assert "parallel_state.get_everything" in message


def test_reading_the_layout_without_torch_distributed_names_what_is_missing() -> None:
    """What an engine user sees: nothing about trainers."""
    with pytest.raises(ConfigError, match=r"torch\.distributed must be initialised") as err:
        reader.parallel_coords()
    assert "trainer" not in str(err.value)


def test_parallel_state_getters(world: None) -> None:
    from megatron.core import parallel_state as ps

    for getter in (*mcore._GETTERS.values(), "model_parallel_is_initialized"):
        mcore.require(callable(getattr(ps, getter, None)), f"parallel_state.{getter}")
    assert mcore.model_parallel_is_initialized()
    ranks = mcore.parallel_ranks()
    for field in dataclasses.fields(ranks):
        want = 0 if field.name.endswith("_rank") else 1
        mcore.require(getattr(ranks, field.name) == want, f"parallel_state getter for {field.name}")
    assert reader.parallel_coords() == (0, 1, ParallelCoords())


def test_tensor_parallel_attributes(world: None) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    t = torch.nn.Parameter(torch.zeros(4, 2))
    assert mcore.tensor_parallel_split(t) is None
    set_tensor_model_parallel_attributes(t, True, 1, 2)
    mcore.require(mcore.tensor_parallel_split(t) == (1, 2), "set_tensor_model_parallel_attributes")


def test_moe_layers_experts_router_bias_and_roles(world: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Qwen2-MoE-shaped GPTModel (dense layer 1, shared expert with its gate, router expert bias):
    MoELayer's experts, global expert ids and bias buffer, and the roles the reader gives them."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from tests.support.trainer_ops import transformer_config

    case = hm.QWEN2_MOE
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))  # the router's buffers
    config = transformer_config(case, tp=1, pp=1, vpp=None, params_dtype=torch.float32)
    config = dataclasses.replace(config, moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=hm.padded_vocab(case, 1),
                     max_sequence_length=64, position_embedding_type="rope")  # fmt: skip
    moe = [i for i, sparse in enumerate(case.moe_layers) if sparse]
    assert moe and len(moe) < case.num_layers  # the case mixes dense and MoE layers
    for i, layer in enumerate(model.decoder.layers):
        parts = mcore.moe_parts(layer.mlp)
        if i not in moe:
            assert parts is None
            continue
        mcore.require(parts is not None, "MoELayer")
        mcore.require(parts.local_expert_ids == tuple(range(case.num_experts)), "MoELayer.local_expert_indices")
        mcore.require(parts.experts is layer.mlp.experts, "MoELayer.experts")
        mcore.require(parts.expert_bias is layer.mlp.router.expert_bias, "TopKRouter.expert_bias")
        assert parts.expert_bias is not None and parts.expert_bias.shape == (case.num_experts,)
    assert mcore.moe_parts(model.decoder.layers[moe[0]].self_attention) is None

    roles = {p.name: p.role for p in reader.local_parameters([model], ParallelCoords())}
    m = f"decoder.layers.{moe[0]}.mlp."
    for e in range(case.num_experts):
        assert roles[f"{m}experts.local_experts.{e}.linear_fc1.weight"] is Role.EXPERT_GATED_COLUMN
        assert roles[f"{m}experts.local_experts.{e}.linear_fc2.weight"] is Role.EXPERT_ROW
    assert roles[f"{m}router.weight"] is Role.REPLICATED
    assert roles[f"{m}router.expert_bias"] is Role.REPLICATED  # a buffer, published like a weight
    assert roles[f"{m}shared_experts.linear_fc1.weight"] is Role.GATED_MLP_COLUMN
    assert roles[f"{m}shared_experts.linear_fc2.weight"] is Role.ROW
    assert roles[f"{m}shared_experts.gate_weight"] is Role.REPLICATED
    dense = f"decoder.layers.{next(i for i in range(case.num_layers) if i not in moe)}.mlp."
    assert roles[f"{dense}linear_fc1.weight"] is Role.GATED_MLP_COLUMN
    meta = reader.model_meta([model], architecture="qwen2_moe", vocab_size=case.vocab_size)
    assert (meta.num_experts, meta.moe_ffn_hidden_size) == (case.num_experts, case.moe_ffn_hidden_size)
    assert meta.ffn_hidden_size == case.ffn_hidden_size


def test_expert_names_become_global_in_both_megatron_namings() -> None:
    """Local expert j of an EP rank is global expert `local_expert_ids[j]`, in SequentialMLP's and
    TEGroupedMLP's naming; the legacy GroupedMLP is refused by name."""
    ids = (4, 5, 6, 7)  # EP rank 1 of 2, 8 experts
    assert reader.global_expert_name("local_experts.2.linear_fc1.weight", ids) == (
        "local_experts.6.linear_fc1.weight", 1, "weight"
    )  # fmt: skip
    assert reader.global_expert_name("linear_fc2.weight0", ids) == ("linear_fc2.weight4", 2, "weight")
    assert reader.global_expert_name("linear_fc2.bias3", ids) == ("linear_fc2.bias7", 2, "bias")
    with pytest.raises(LayoutError, match=r"GroupedMLP"):
        reader.global_expert_name("weight1", ids)
    with pytest.raises(LayoutError, match=r"local expert 4, but the layer holds 4"):
        reader.global_expert_name("local_experts.4.linear_fc1.weight", ids)


def test_gpt_model_modules_attributes_and_roles(world: None) -> None:
    model = gpt_model()
    layer = model.decoder.layers[0]
    mcore.require(mcore.is_gpt_model(model), "GPTModel.decoder / .config")
    mcore.require(mcore.is_vocab_parallel_embedding(model.embedding.word_embeddings), "VocabParallelEmbedding")
    mcore.require(mcore.fused_qkv(layer.self_attention) is layer.self_attention.linear_qkv, "Attention.linear_qkv")
    mcore.require(mcore.gated_fc1(layer.mlp) is layer.mlp.linear_fc1, "MLP.linear_fc1 with gated_linear_unit")
    assert mcore.fused_qkv(layer.mlp) is None and mcore.gated_fc1(layer.self_attention) is None
    assert mcore.gated_fc1(gpt_model(gated_linear_unit=False).decoder.layers[0].mlp) is None
    mcore.require(mcore.layer_numbers(model) == list(range(1, CASE.num_layers + 1)), "TransformerLayer.layer_number")
    mcore.require(mcore.padded_vocab_size(model) == VOCAB, "GPTModel.vocab_size")
    mcore.require(mcore.shares_embeddings(model) is False, "GPTModel.share_embeddings_and_output_weights")
    mcore.require(mcore.is_first_stage(model), "GPTModel.pre_process")
    mcore.require(mcore.output_layer(model) is model.output_layer, "GPTModel.output_layer")
    shape = mcore.transformer_shape(mcore.model_config(model))
    mcore.require(
        (shape.num_attention_heads, shape.num_query_groups, shape.kv_channels, shape.ffn_hidden_size)
        == (CASE.num_heads, CASE.num_query_groups, CASE.head_dim, CASE.ffn_hidden_size),
        "TransformerConfig fields",
    )
    assert shape.num_moe_experts == 0 and not shape.multi_latent_attention

    # What the reader makes of it: every role comes from the modules and attributes checked above.
    params = {p.name: p for p in reader.local_parameters([model], ParallelCoords())}
    want = {
        "embedding.word_embeddings.weight": Role.VOCAB_PARALLEL,
        "output_layer.weight": Role.VOCAB_PARALLEL,
        "decoder.final_layernorm.weight": Role.REPLICATED,
    }
    for i in range(CASE.num_layers):
        want |= {
            f"decoder.layers.{i}.input_layernorm.weight": Role.REPLICATED,
            f"decoder.layers.{i}.self_attention.linear_qkv.weight": Role.QKV_COLUMN,
            f"decoder.layers.{i}.self_attention.linear_proj.weight": Role.ROW,
            f"decoder.layers.{i}.pre_mlp_layernorm.weight": Role.REPLICATED,
            f"decoder.layers.{i}.mlp.linear_fc1.weight": Role.GATED_MLP_COLUMN,
            f"decoder.layers.{i}.mlp.linear_fc2.weight": Role.ROW,
        }
    assert {name: p.role for name, p in params.items()} == want
    fc1 = params["decoder.layers.0.mlp.linear_fc1.weight"]
    assert (fc1.partition_dim, fc1.partition_stride, fc1.offset) == (0, 2, 0)
    meta = reader.model_meta([model], architecture=None, vocab_size=CASE.vocab_size)
    assert (meta.architecture, meta.padded_vocab_size, meta.num_query_groups) == ("llama", VOCAB, CASE.num_query_groups)


def test_wrappers_keep_the_model_in_module(world: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    model = gpt_model()
    # DDP allocates its buffers on torch.cuda.current_device(); this CPU-only torch has none.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    mcore.require(mcore.unwrap_model(ddp) is model, "DistributedDataParallel.module")
    half = gpt_model()
    wrapped = Float16Module(dataclasses.replace(half.config, bf16=True), half)
    mcore.require(mcore.unwrap_model(wrapped) is half, "Float16Module.module")
    assert reader.model_chunks([wrapped]) == [half]


@pytest.mark.parametrize(
    ("distributed_optimizer", "overlap"),
    [(False, False), (True, False), (True, True), (False, True)],
    ids=["plain", "distopt", "distopt-overlap", "overlap-only"],
)
def test_ddp_defers_the_param_gather_exactly_when_its_forward_hooks_gather(
    world: None, monkeypatch: pytest.MonkeyPatch, distributed_optimizer: bool, overlap: bool
) -> None:
    """DDP gathers params in the next forward iff it hooked the model's forwards (0.16.1: distributed
    optimizer and overlap; 0.19: overlap alone, the layer-wise optimizer's case too). refit's answer is
    checked against the hooks DDP registered, and the forced gather leaves every group dispatched."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model = gpt_model()
    assert not any(m._forward_pre_hooks for m in model.modules())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    cfg = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer, overlap_param_gather=overlap)
    ddp = DistributedDataParallel(model.config, cfg, model)
    hooked = any(m._forward_pre_hooks for m in model.modules())
    mcore.require(mcore.defers_param_gather(ddp) == hooked, "DistributedDataParallel.use_forward_hook")
    if overlap and distributed_optimizer:
        assert hooked  # the case refit was written for defers in every supported version
    if hooked:
        mcore.gather_params(ddp)
        groups = [*ddp.bucket_groups, *getattr(ddp, "expert_parallel_bucket_groups", [])]
        assert groups
        for group in groups:
            mcore.require(group.param_gather_dispatched and group.param_gather_handle is None, "start_param_sync")


def test_generalized_tensor_parallel_weights_are_refused_by_name() -> None:
    """megatron-core >= 0.19 can split weights beyond TP (`tensor_parallel_num_weight_shards`); refit
    cannot describe those parts, so it says so before anything is read."""
    from megatron.core.transformer import TransformerConfig

    if not any(f.name == "tensor_parallel_num_weight_shards" for f in dataclasses.fields(TransformerConfig)):
        pytest.skip(f"megatron-core {mcore.version()} has no generalized tensor parallelism")
    from tests.support.trainer_ops import transformer_config

    config = transformer_config(CASE, tp=1, pp=1, vpp=None, params_dtype=torch.float32)
    assert mcore.transformer_shape(config).num_layers == CASE.num_layers
    sharded = dataclasses.replace(config, tensor_parallel_num_weight_shards=2)
    with pytest.raises(ConfigError, match="tensor_parallel_num_weight_shards=2"):
        mcore.transformer_shape(sharded)


def test_megatron_optimizer_chain(world: None) -> None:
    """A ChainedOptimizer of two members: its `optimizer` property asserts, so the chain is walked first."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer, MegatronOptimizer
    from megatron.core.optimizer.optimizer_config import OptimizerConfig

    sgds = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1) for _ in range(2)]

    def megatron_optimizer(sgd: torch.optim.Optimizer) -> MegatronOptimizer:
        # FP32Optimizer's own __init__ allocates on CUDA; the base initializer is what keeps `.optimizer`.
        opt = FP32Optimizer.__new__(FP32Optimizer)
        MegatronOptimizer.__init__(opt, sgd, OptimizerConfig())
        return opt

    single = megatron_optimizer(sgds[0])
    mcore.require(mcore.torch_optimizers(single) == [sgds[0]], "MegatronOptimizer.optimizer")
    chained = ChainedOptimizer([megatron_optimizer(s) for s in sgds])
    mcore.require(mcore.torch_optimizers(chained) == sgds, "ChainedOptimizer.chained_optimizers")
    assert mcore.torch_optimizers(sgds[1]) == [sgds[1]]
    assert mcore.torch_optimizers(object()) == []
