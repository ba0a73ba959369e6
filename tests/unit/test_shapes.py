"""`refit.plan.shapes`: a dense model's Megatron tensors from its dimensions, and the targets they give an engine.

At TP 1 the targets must be exactly the parameters of the transformers model built from the same
config (names and shapes). At engine TP 2 and 4 they must be what vLLM holds per rank: the shapes
`VLLMEngine` used to derive by hand (q heads and gate/up rows split, KV heads split or replicated,
row-parallel columns split, the rank's real vocabulary rows).
"""

from __future__ import annotations

import math

import pytest

from refit.errors import LayoutError, ModelMismatchError
from refit.plan.shapes import dense_targets, dense_tensors
from refit.plan.targets import EngineLayout
from refit.types import ModelMeta, Role
from tests.support import hf_models as hm

CASES = [hm.LLAMA_GQA, hm.LLAMA_1KV_TIED, hm.QWEN2_BIAS, hm.QWEN3_QKNORM, hm.LLAMA_PADDED, hm.LLAMA_BF16]


def meta(case: hm.ModelCase, **overrides) -> ModelMeta:
    """The catalog's description of `case` as a Megatron trainer at TP 1 publishes it."""
    fields = dict(
        architecture=case.architecture,
        num_layers=case.num_layers,
        hidden_size=case.hidden_size,
        num_attention_heads=case.num_heads,
        num_query_groups=case.num_query_groups,
        kv_channels=case.head_dim,
        ffn_hidden_size=case.ffn_hidden_size,
        padded_vocab_size=hm.padded_vocab(case, 1),
        vocab_size=case.vocab_size,
        tied_embeddings=case.tied,
        qkv_bias=case.architecture == "qwen2",
        qk_layernorm=case.architecture == "qwen3",
        params_dtype=case.dtype,
    )
    return ModelMeta(**{**fields, **overrides})


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_targets_at_tp1_are_the_transformers_models_parameters(case: hm.ModelCase) -> None:
    model = hm.build_hf_model(case, seed=1)
    hf = {n: (tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in model.named_parameters()}
    if case.tied:
        hf.pop("lm_head.weight", None)  # the embedding table, under its other name
    targets = dense_targets(meta(case), EngineLayout(vocab_size=case.vocab_size))
    assert {n: (t.shape, t.dtype) for n, t in targets.items()} == hf


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_descriptors_are_whole_megatron_tensors(case: hm.ModelCase) -> None:
    descs = dense_tensors(meta(case))
    assert len({d.name for d in descs}) == len(descs)
    for d in descs:
        assert d.local_shape == d.global_shape and d.offset == 0 and d.dtype == case.dtype
        assert d.partition_dim == d.role.partition_dim
    roles = {d.name: d.role for d in descs}
    assert roles["embedding.word_embeddings.weight"] is Role.VOCAB_PARALLEL
    assert ("output_layer.weight" in roles) is not case.tied
    assert roles["decoder.layers.0.mlp.linear_fc1.weight"] is Role.GATED_MLP_COLUMN
    assert roles["decoder.layers.0.self_attention.linear_proj.weight"] is Role.ROW
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in roles) is (case.architecture == "qwen2")
    assert ("decoder.layers.0.self_attention.q_layernorm.weight" in roles) is (case.architecture == "qwen3")


def _by_hand(case: hm.ModelCase, rank: int, tp: int) -> dict[str, tuple[int, ...]]:
    """Per-rank shapes as vLLM holds them, derived by hand (what VLLMEngine computed before shapes.py)."""
    h, d, f = case.hidden_size, case.head_dim, case.ffn_hidden_size
    q, kv = case.num_heads // tp * d, max(1, case.num_query_groups // tp) * d
    padded = math.ceil(case.vocab_size / 64) * 64
    per = padded // tp
    vocab = max(0, min(case.vocab_size, (rank + 1) * per) - rank * per)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not case.tied:
        out["lm_head.weight"] = (vocab, h)
    for i in range(case.num_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f // tp, h),
            p + "mlp.up_proj.weight": (f // tp, h),
            p + "mlp.down_proj.weight": (h, f // tp),
        }
        if case.architecture == "qwen2":
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)}
            out[p + "self_attn.v_proj.bias"] = (kv,)
        if case.architecture == "qwen3":
            out |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    return out


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_targets_at_engine_tp_are_vllms_shard_shapes(case: hm.ModelCase, tp: int) -> None:
    for rank in range(tp):
        layout = EngineLayout(tp_rank=rank, tp_size=tp, vocab_size=case.vocab_size)
        targets = dense_targets(meta(case, padded_vocab_size=hm.padded_vocab(case, tp)), layout)
        assert {n: t.shape for n, t in targets.items()} == _by_hand(case, rank, tp), (case.id, rank)


def test_a_non_gated_mlp_has_a_single_up_projection() -> None:
    model = meta(hm.LLAMA_GQA, gated_linear_unit=False)
    fc1 = next(d for d in dense_tensors(model) if d.name == "decoder.layers.0.mlp.linear_fc1.weight")
    assert fc1.role is Role.COLUMN and fc1.global_shape == (256, 128)
    targets = dense_targets(model, EngineLayout(tp_rank=1, tp_size=2))
    assert targets["model.layers.0.mlp.up_proj.weight"].shape == (128, 128)
    assert "model.layers.0.mlp.gate_proj.weight" not in targets


def test_moe_models_and_indivisible_layouts_are_refused() -> None:
    with pytest.raises(LayoutError, match="experts"):
        dense_tensors(meta(hm.LLAMA_GQA, num_experts=8, moe_ffn_hidden_size=64))
    with pytest.raises(ModelMismatchError, match="not divisible by engine TP size 3"):
        dense_targets(meta(hm.LLAMA_GQA), EngineLayout(tp_rank=0, tp_size=3))
