"""The engine boundary's values and checks: EngineSpec, its layout, and the compatibility check."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from refit.engines.base import (
    MODEL_FIELDS,
    EngineSpec,
    TensorSpec,
    check_compatible,
    check_install,
    spec_from_hf_config,
)
from refit.errors import ConfigError, ModelMismatchError
from refit.plan.targets import DEFAULT_VOCAB_PADDING, EngineLayout, Scheme
from refit.types import ModelMeta
from tests.support import catalog_samples as samples
from tests.support import hf_models as hm

META = samples.MODEL


def spec(**changes: object) -> EngineSpec:
    return EngineSpec.from_meta(META, **changes)


def test_the_model_fields_are_exactly_those_shared_with_model_meta() -> None:
    shared = {f.name for f in dataclasses.fields(EngineSpec)} & {f.name for f in dataclasses.fields(ModelMeta)}
    assert set(MODEL_FIELDS) == shared
    assert {
        "architecture",
        "num_query_groups",
        "tied_embeddings",
        "vocab_size",
        "num_experts",
        "moe_ffn_hidden_size",
    } <= shared


def test_from_meta_copies_the_model_and_takes_the_engine_fields() -> None:
    s = spec(tp_rank=1, tp_size=2, ep_rank=1, ep_size=2, scheme="megatron")
    assert all(getattr(s, name) == getattr(META, name) for name in MODEL_FIELDS)
    assert (s.tp_rank, s.tp_size, s.ep_rank, s.ep_size) == (1, 2, 1, 2)
    assert s.scheme is Scheme.MEGATRON  # a string is accepted and stored as the enum
    check_compatible(s, META)


def test_layout_carries_every_engine_convention() -> None:
    s = spec(
        tp_rank=1, tp_size=4, ep_rank=3, ep_size=4, expert_tp_rank=1, expert_tp_size=2, scheme=Scheme.MEGATRON,
        padded_vocab_size=256, vocab_padding=128,
    )  # fmt: skip
    assert s.layout() == EngineLayout(
        tp_rank=1, tp_size=4, ep_rank=3, ep_size=4, expert_tp_rank=1, expert_tp_size=2, scheme=Scheme.MEGATRON,
        vocab_size=META.vocab_size, padded_vocab_size=256, vocab_padding=128,
    )  # fmt: skip
    defaults = EngineLayout()
    assert spec().layout() == dataclasses.replace(defaults, vocab_size=META.vocab_size, padded_vocab_size=128)
    assert spec().vocab_padding == DEFAULT_VOCAB_PADDING == defaults.vocab_padding


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"scheme": "vllm"}, "unknown engine scheme 'vllm'"),
        ({"tp_rank": 2, "tp_size": 2}, "tp_rank 2"),
        ({"ep_size": 0}, "ep_size 0"),
        ({"expert_tp_rank": 1, "expert_tp_size": 1}, "expert_tp_rank 1"),
        ({"vocab_padding": 0}, "vocab_padding"),
        ({"vocab_size": -1}, "vocab sizes"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_query_groups": 3}, "not a multiple of num_query_groups 3"),
        ({"num_experts": -1}, "num_experts must be >= 0"),
        ({"moe_ffn_hidden_size": -1}, "moe_ffn_hidden_size must be >= 0"),
        ({"num_experts": 6, "ep_rank": 1, "ep_size": 4}, "ep_size 4 does not divide its num_experts 6"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        spec(**changes)


@pytest.mark.parametrize(
    "field",
    ["architecture", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
     "ffn_hidden_size", "tied_embeddings"],
)  # fmt: skip
def test_every_shared_model_field_is_compared(field: str) -> None:
    value = getattr(META, field)
    other = {str: "qwen3", bool: not value}.get(type(value), value * 2 if isinstance(value, int) else value)
    changes = {field: other}
    if field == "num_attention_heads":
        changes["num_attention_heads"] = META.num_query_groups * 4
    with pytest.raises(ModelMismatchError, match=f"{field}: engine"):
        check_compatible(spec(**changes), META)


def test_wildcards_and_the_engines_own_padding() -> None:
    check_compatible(spec(architecture="", vocab_size=0), META)  # "whatever the catalog says"
    check_compatible(spec(padded_vocab_size=META.padded_vocab_size * 2), META)  # a Megatron engine may pad more
    check_compatible(spec(), dataclasses.replace(META, vocab_size=0))  # the catalog declared none
    with pytest.raises(ModelMismatchError, match="vocab_size: engine 99 vs catalog 100"):
        check_compatible(spec(vocab_size=99), META)
    with pytest.raises(ModelMismatchError, match="vocab_size: engine 200 > catalog's padded 128"):
        check_compatible(spec(vocab_size=200), dataclasses.replace(META, vocab_size=0))


def test_the_hf_config_path_derives_heads_groups_and_kv_channels() -> None:
    config = hm.hf_config(hm.LLAMA_GQA)
    s = spec_from_hf_config(config, architecture="llama", tp_rank=1, tp_size=2, vocab_padding=128)
    assert (s.num_attention_heads, s.num_query_groups) == (config.num_attention_heads, config.num_key_value_heads)
    assert s.kv_channels == hm.LLAMA_GQA.head_dim  # head_dim when the config sets it, else hidden / heads
    assert (s.tp_rank, s.tp_size, s.vocab_padding, s.scheme) == (1, 2, 128, Scheme.HF)


def test_check_install_with_a_device_checks_that_each_tensor_can_be_copied() -> None:
    expected = {"w": TensorSpec(shape=(2, 3), dtype="float32")}
    check_install(expected, {"w": torch.zeros(2, 3)}, device=torch.device("cpu"))
    check_install(expected, {"w": torch.empty(2, 3, device="meta")})  # without a device: names, shapes, dtypes
    with pytest.raises(ModelMismatchError, match=r"w: a torch\.strided tensor on meta holds no copyable data"):
        check_install(expected, {"w": torch.empty(2, 3, device="meta")}, device=torch.device("cpu"))
    with pytest.raises(ModelMismatchError, match=r"w: got \(3, 2\)"):
        check_install(expected, {"w": torch.zeros(3, 2)}, device=torch.device("cpu"))
    with pytest.raises(ModelMismatchError, match="missing"):
        check_install(expected, {}, device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"num_experts": 8, "moe_ffn_hidden_size": 16},
            "num_experts: engine 8 vs catalog 0",
        ),  # MoE engine, dense model
        ({"moe_ffn_hidden_size": 16}, "moe_ffn_hidden_size: engine 16 vs catalog 0"),
    ],
)
def test_a_moe_engine_refuses_a_dense_catalog(changes: dict, match: str) -> None:
    assert META.num_experts == 0
    with pytest.raises(ModelMismatchError, match=match):
        check_compatible(spec(**changes), META)


def test_a_dense_hf_config_has_no_experts_and_engine_ep_of_a_dense_model_is_allowed() -> None:
    s = spec_from_hf_config(hm.hf_config(hm.LLAMA_GQA), architecture="llama")
    assert (s.num_experts, s.moe_ffn_hidden_size, s.ffn_hidden_size) == (0, 0, hm.LLAMA_GQA.ffn_hidden_size)
    check_compatible(spec(ep_rank=1, ep_size=2), META)  # nothing to split: a dense model at engine EP 2
