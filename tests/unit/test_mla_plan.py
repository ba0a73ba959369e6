"""DeepSeek-V3 (multi-latent attention + DeepSeek MoE) through the library's model description, names,
targets and shapes, against independent references: transformers' own `DeepseekV3ForCausalLM` (the
names, shapes and dtypes an `HFEngine` holds, its config's dimensions) and a real megatron-core MLA
GPTModel read by the library's Megatron reader (roles, metadata, published names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from refit.catalog.wire import model_from_bytes, model_to_bytes
from refit.engines import HFEngine
from refit.engines.base import EngineSpec, TensorSpec, check_compatible, spec_from_hf_config
from refit.errors import ConfigError, LayoutError, ModelMismatchError
from refit.megatron import model as reader
from refit.plan.naming import ARCHITECTURES, architecture_from_hf, hf_names
from refit.plan.shapes import model_tensors
from refit.plan.targets import EngineLayout, Scheme, targets_for
from refit.types import ModelMeta, ParallelCoords, Role
from tests.support import hf_models as hm

transformers = pytest.importorskip("transformers")

L, HL = "decoder.layers.3.", "model.layers.3."


def meta_of(case: hm.ModelCase) -> ModelMeta:
    """The ModelMeta a trainer of `case` declares (written from the HF config by hand)."""
    cfg = case.hf_config
    return ModelMeta(
        architecture="deepseek_v3", num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=cfg["num_attention_heads"],
        kv_channels=cfg["v_head_dim"], ffn_hidden_size=cfg["intermediate_size"],
        padded_vocab_size=hm.padded_vocab(case, 1), vocab_size=cfg["vocab_size"], qk_layernorm=True,
        num_experts=cfg["n_routed_experts"], moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        q_lora_rank=cfg["q_lora_rank"] or 0, kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("megatron", "hf"),
    [
        (L + "self_attention.linear_q_down_proj.weight", HL + "self_attn.q_a_proj.weight"),
        (L + "self_attention.q_layernorm.weight", HL + "self_attn.q_a_layernorm.weight"),
        (L + "self_attention.linear_q_up_proj.layer_norm_weight", HL + "self_attn.q_a_layernorm.weight"),  # TE
        (L + "self_attention.linear_q_up_proj.weight", HL + "self_attn.q_b_proj.weight"),
        (L + "self_attention.linear_q_proj.weight", HL + "self_attn.q_proj.weight"),
        (L + "self_attention.linear_kv_down_proj.weight", HL + "self_attn.kv_a_proj_with_mqa.weight"),
        (L + "self_attention.kv_layernorm.weight", HL + "self_attn.kv_a_layernorm.weight"),
        (L + "self_attention.linear_kv_up_proj.layer_norm_weight", HL + "self_attn.kv_a_layernorm.weight"),  # TE
        (L + "self_attention.linear_kv_up_proj.weight", HL + "self_attn.kv_b_proj.weight"),
        (L + "self_attention.linear_proj.weight", HL + "self_attn.o_proj.weight"),
        (L + "mlp.router.weight", HL + "mlp.gate.weight"),
        (L + "mlp.router.expert_bias", HL + "mlp.gate.e_score_correction_bias"),
        (L + "mlp.shared_experts.linear_fc2.weight", HL + "mlp.shared_experts.down_proj.weight"),
        (L + "mlp.experts.local_experts.5.linear_fc2.weight", HL + "mlp.experts.5.down_proj.weight"),
    ],
)
def test_deepseek_v3_names(megatron: str, hf: str) -> None:
    assert hf_names(megatron, architecture="deepseek_v3") == (hf,)


def test_deepseek_v3_names_keep_other_architectures_unchanged() -> None:
    assert architecture_from_hf("DeepseekV3ForCausalLM") == "deepseek_v3" and "deepseek_v3" in ARCHITECTURES
    assert hf_names(L + "mlp.shared_experts.linear_fc1.weight", architecture="deepseek_v3") == (
        HL + "mlp.shared_experts.gate_proj.weight", HL + "mlp.shared_experts.up_proj.weight",
    )  # fmt: skip
    assert hf_names(L + "self_attention.q_layernorm.weight", architecture="qwen3") == (HL + "self_attn.q_norm.weight",)
    with pytest.raises(LayoutError, match="no Hugging Face name"):  # multi-token prediction: out of scope
        hf_names("mtp.layers.0.eh_proj.weight", architecture="deepseek_v3")


@pytest.mark.parametrize("case", hm.MLA_CASES, ids=lambda c: c.id)
def test_shapes_through_hf_targets_are_exactly_what_the_hf_engine_holds(case: hm.ModelCase) -> None:
    """Every tensor of the model (the routers' fp32 bias buffers included) under its HF name, with HF's
    shape and dtype: nothing missing, nothing extra."""
    engine = HFEngine(hm.build_hf_model(case, seed=1))
    meta = meta_of(case)
    moe = frozenset(i for i, sparse in enumerate(case.moe_layers) if sparse)
    shared = case.hf_config["n_shared_experts"] * case.hf_config["moe_intermediate_size"]
    planned = {
        t.hf_name: TensorSpec(shape=t.shape, dtype=t.dtype)
        for desc in model_tensors(meta, moe, shared)
        for t in targets_for(meta, desc, EngineLayout())
    }
    assert planned == engine.expected()
    assert engine.expected()[HL + "mlp.gate.e_score_correction_bias"].dtype == "float32"
    check_compatible(engine.spec(), meta)


def _rows(meta: ModelMeta, name: str, layout: EngineLayout) -> dict[str, tuple[int | None, tuple]]:
    desc = next(d for d in model_tensors(meta, frozenset({3}), 32) if d.name == name)
    return {t.hf_name: (t.dim, t.rows) for t in targets_for(meta, desc, layout)}


def test_tp2_targets_split_heads_and_keep_hf_down_projections_whole() -> None:
    """HF convention (vLLM): q_a_proj and kv_a_proj_with_mqa whole on every rank, q_b_proj / kv_b_proj by
    heads, o_proj by head columns. Megatron convention (local spec): the down projections by rows too."""
    meta = meta_of(hm.DEEPSEEK_V3)  # 4 heads; q head 16 + 8 rows, kv head 16 + 12 rows, q_lora 32, kv 24 + 8
    hf1 = EngineLayout(tp_rank=1, tp_size=2)
    a = L + "self_attention."
    assert _rows(meta, a + "linear_q_down_proj.weight", hf1) == {HL + "self_attn.q_a_proj.weight": (0, ((0, 32),))}
    assert _rows(meta, a + "linear_kv_down_proj.weight", hf1) == {
        HL + "self_attn.kv_a_proj_with_mqa.weight": (0, ((0, 32),))
    }
    assert _rows(meta, a + "linear_q_up_proj.weight", hf1) == {HL + "self_attn.q_b_proj.weight": (0, ((48, 96),))}
    assert _rows(meta, a + "linear_kv_up_proj.weight", hf1) == {HL + "self_attn.kv_b_proj.weight": (0, ((56, 112),))}
    assert _rows(meta, a + "linear_proj.weight", hf1) == {HL + "self_attn.o_proj.weight": (1, ((24, 48),))}
    assert _rows(meta, a + "kv_layernorm.weight", hf1) == {HL + "self_attn.kv_a_layernorm.weight": (None, ())}
    mg1 = EngineLayout(tp_rank=1, tp_size=2, scheme=Scheme.MEGATRON)
    assert _rows(meta, a + "linear_q_down_proj.weight", mg1) == {a + "linear_q_down_proj.weight": (0, ((16, 32),))}
    assert _rows(meta, a + "linear_kv_down_proj.weight", mg1) == {a + "linear_kv_down_proj.weight": (0, ((16, 32),))}
    assert _rows(meta, L + "mlp.router.expert_bias", mg1) == {L + "mlp.router.expert_bias": (None, ())}


def test_spec_from_a_deepseek_v3_config() -> None:
    for case in hm.MLA_CASES:
        config = hm.build_hf_model(case, seed=1).config
        assert spec_from_hf_config(config, architecture="deepseek_v3") == EngineSpec.from_meta(
            meta_of(case), vocab_size=case.hf_config["vocab_size"], padded_vocab_size=0
        )


def test_mla_fields_are_compared_and_carried_on_the_wire() -> None:
    meta = meta_of(hm.DEEPSEEK_V3)
    assert model_from_bytes(model_to_bytes(meta)) == meta
    check_compatible(EngineSpec.from_meta(meta), meta)
    # A GQA engine of equal size (same heads, head output, FFNs, experts): every MLA field is named.
    gqa = EngineSpec.from_meta(meta, architecture="", **dict.fromkeys(
        ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"), 0))  # fmt: skip
    with pytest.raises(ModelMismatchError) as err:
        check_compatible(gqa, meta)
    for field in ("q_lora_rank: engine 0 vs catalog 32", "kv_lora_rank: engine 0 vs catalog 24", "qk_rope_head_dim"):
        assert field in str(err.value)
    for overrides, field in [
        (dict(qk_rope_head_dim=4, qk_nope_head_dim=20), "qk_rope_head_dim: engine 4 vs catalog 8"),
        (dict(kv_lora_rank=16), "kv_lora_rank: engine 16 vs catalog 24"),
        (dict(q_lora_rank=0), "q_lora_rank: engine 0 vs catalog 32"),
    ]:
        with pytest.raises(ModelMismatchError, match=field):
            check_compatible(EngineSpec.from_meta(meta, **overrides), meta)


def test_model_meta_refuses_inconsistent_mla_dims() -> None:
    meta = meta_of(hm.DEEPSEEK_V3)
    with pytest.raises(ConfigError, match="without a kv_lora_rank"):
        dataclasses.replace(meta, kv_lora_rank=0)
    with pytest.raises(ConfigError, match="v_head_dim must be positive"):
        dataclasses.replace(meta, v_head_dim=0)
    with pytest.raises(ConfigError, match="kv_lora_rank must be >= 0"):
        EngineSpec.from_meta(meta, kv_lora_rank=-1)


# -- the Megatron reader on a real megatron-core MLA GPTModel (TP 1, local spec) ----------------------


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One-process Megatron world, and for this test only what building MLA on a CPU torch needs:
    RotaryEmbedding asks `torch.cuda.current_device()`, and MLA sees Transformer Engine's mock
    (tests/support/megatron_mla.py, cluster.py's `apply_cpu_shims`)."""
    from megatron.core.transformer import multi_latent_attention

    from tests.support.engine_ops import one_process_world

    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(multi_latent_attention, "HAVE_TE", False)
    with one_process_world():
        yield


def mla_gpt_model(case: hm.ModelCase, **overrides: Any) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from tests.support import megatron_mla
    from tests.support.trainer_ops import transformer_config

    config = transformer_config(case, tp=1, pp=1, vpp=None, params_dtype=torch.float32)
    config = dataclasses.replace(config, **overrides)
    spec = megatron_mla.fit_local_spec(
        get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    )
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=hm.padded_vocab(case, 1),
                    max_sequence_length=64, position_embedding_type="rope")  # fmt: skip


@pytest.mark.parametrize("case", hm.MLA_CASES, ids=lambda c: c.id)
def test_reader_describes_a_real_mla_model(world: None, case: hm.ModelCase) -> None:
    """Metadata from the config (deepseek_v3, the MLA dims); roles from module types and TP attributes;
    every published tensor, the router biases included, is exactly one of HF's."""
    chunks = reader.model_chunks(mla_gpt_model(case))
    meta = reader.model_meta(chunks, architecture=None, vocab_size=case.hf_config["vocab_size"])
    assert meta == meta_of(case)
    params = reader.local_parameters(chunks, ParallelCoords())
    roles = {p.name: p.role for p in params}
    a = "decoder.layers.1.self_attention."
    q = ["linear_q_down_proj", "linear_q_up_proj"] if case.hf_config["q_lora_rank"] else ["linear_q_proj"]
    for name in [*q, "linear_kv_down_proj", "linear_kv_up_proj"]:
        assert roles[f"{a}{name}.weight"] is Role.COLUMN, name
    assert roles[a + "linear_proj.weight"] is Role.ROW
    assert roles[a + "kv_layernorm.weight"] is Role.REPLICATED
    assert roles["decoder.layers.1.mlp.router.expert_bias"] is Role.REPLICATED
    assert roles["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"] is Role.GATED_MLP_COLUMN
    assert roles["decoder.layers.0.mlp.linear_fc1.weight"] is Role.GATED_MLP_COLUMN  # the dense first layer
    published = {hf for p in params for hf in hf_names(p.name, architecture="deepseek_v3")}
    hf_model = hm.build_hf_model(case, seed=1)
    assert published == set(HFEngine(hf_model).expected())


def test_reader_refuses_multi_token_prediction(world: None) -> None:
    chunks = reader.model_chunks(mla_gpt_model(hm.DEEPSEEK_V3))
    chunks[0].config = dataclasses.replace(chunks[0].config, mtp_num_layers=1)
    with pytest.raises(LayoutError, match="multi-token prediction"):
        reader.model_meta(chunks, architecture=None, vocab_size=0)


def test_reader_reads_the_fp32_expert_bias_megatron_keeps_in_a_bf16_model(world: None) -> None:
    """A cast model (`.bfloat16()`, as Float16Module does) holds a bf16 `expert_bias` until its router
    next runs, saves or loads, which swaps in new fp32 storage: the reader publishes that storage."""
    model = mla_gpt_model(hm.DEEPSEEK_V3).bfloat16()
    router = model.decoder.layers[1].mlp.router
    assert router.expert_bias.dtype == torch.bfloat16
    params = {p.name: p.param for p in reader.local_parameters(reader.model_chunks(model), ParallelCoords())}
    bias = params["decoder.layers.1.mlp.router.expert_bias"]
    assert bias.dtype == torch.float32 and params["decoder.layers.1.mlp.router.weight"].dtype == torch.bfloat16
    model.state_dict()  # what would have swapped the storage under a publisher registered before it
    assert router.expert_bias is bias and router.expert_bias.data_ptr() == bias.data_ptr()


def test_vllm_names_of_mla_projections() -> None:
    """vLLM's DeepSeek-V2/V3 fuses the two down projections only with a query latent; its `q_proj`
    is never Llama's fused `qkv_proj`."""
    from refit.engines.vllm_names import fused_projections, vllm_target

    a = HL + "self_attn."
    fused = fused_projections("deepseek_v3", [a + "fused_qkv_a_proj.weight", a + "q_b_proj.weight"])
    assert vllm_target(a + "q_a_proj.weight", "deepseek_v3", fused) == (a + "fused_qkv_a_proj.weight", 0)
    assert vllm_target(a + "kv_a_proj_with_mqa.weight", "deepseek_v3", fused) == (a + "fused_qkv_a_proj.weight", 1)
    for name in ("q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight", "kv_a_layernorm.weight"):
        assert vllm_target(a + name, "deepseek_v3", fused) == (a + name, None)
    shared = HL + "mlp.shared_experts."
    assert vllm_target(shared + "up_proj.weight", "deepseek_v3", fused) == (shared + "gate_up_proj.weight", 1)
    assert vllm_target(HL + "mlp.gate.e_score_correction_bias", "deepseek_v3", fused) == (
        HL + "mlp.gate.e_score_correction_bias", None)  # fmt: skip

    no_latent = fused_projections("deepseek_v3", [a + "kv_a_proj_with_mqa.weight", a + "q_proj.weight"])
    for name in ("q_proj.weight", "kv_a_proj_with_mqa.weight"):
        assert vllm_target(a + name, "deepseek_v3", no_latent) == (a + name, None)
    assert vllm_target(HL + "mlp.gate_proj.weight", "deepseek_v3", no_latent) == (HL + "mlp.gate_up_proj.weight", 0)
    assert vllm_target(a + "q_proj.weight", "llama", fused_projections("llama", [])) == (a + "qkv_proj.weight", "q")
