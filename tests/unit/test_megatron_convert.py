"""The test-side HF -> Megatron converter, checked against hand-written index arithmetic.

Every HF tensor is rebuilt element row by element row (or column by column) from the per-rank
shards, by computing where Megatron keeps that row: which TP rank and which local row. The
arithmetic is written out here from Megatron-Core's layout (the `core_v0.16.1` sources listed in
tests/support/megatron_convert.py), not taken from the converter or any library, so a converter bug
cannot cancel itself out.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support import hf_models as hm
from tests.support.megatron_convert import hf_to_megatron_local


def shards_for(case: hm.ModelCase, sd: dict, tp: int, layers: list[int], pre: bool, post: bool) -> list[dict]:
    return [
        hf_to_megatron_local(
            sd,
            case,
            tp_size=tp,
            tp_rank=r,
            layers=layers,
            pre_process=pre,
            post_process=post,
            padded_vocab=hm.padded_vocab(case, tp),
        )
        for r in range(tp)
    ]


def expected_local_shapes(case: hm.ModelCase, sd: dict, tp: int, n_layers: int, pre: bool, post: bool) -> dict:
    """Local names and shapes of one rank: `named_parameters()` of a GPTModel built with the local layer spec."""
    h, nh, ng, d, f = case.hidden_size, case.num_heads, case.num_query_groups, case.head_dim, case.ffn_hidden_size
    vp = hm.padded_vocab(case, tp)
    out = {}
    for i in range(n_layers):
        p = f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attention.linear_qkv.weight"] = ((nh + 2 * ng) * d // tp, h)
        if "model.layers.0.self_attn.q_proj.bias" in sd:
            out[p + "self_attention.linear_qkv.bias"] = ((nh + 2 * ng) * d // tp,)
        if "model.layers.0.self_attn.q_norm.weight" in sd:
            out[p + "self_attention.q_layernorm.weight"] = (d,)
            out[p + "self_attention.k_layernorm.weight"] = (d,)
        out[p + "self_attention.linear_proj.weight"] = (h, nh * d // tp)
        out[p + "pre_mlp_layernorm.weight"] = (h,)
        out[p + "mlp.linear_fc1.weight"] = (2 * f // tp, h)
        out[p + "mlp.linear_fc2.weight"] = (h, f // tp)
    if pre:
        out["embedding.word_embeddings.weight"] = (vp // tp, h)
    if post:
        out["decoder.final_layernorm.weight"] = (h,)
        if not case.tied:
            out["output_layer.weight"] = (vp // tp, h)
    return out


def rebuild_hf(case: hm.ModelCase, shards: list[dict], layers: list[int], pre: bool, post: bool) -> dict:
    """Invert the layout by explicit per-row / per-column index arithmetic."""
    tp = len(shards)
    nh, ng, d, f = case.num_heads, case.num_query_groups, case.head_dim, case.ffn_hidden_size
    per_group = nh // ng
    qkv_rows_per_rank = (nh + 2 * ng) * d // tp

    def qkv_row(global_row: int, tensor: str) -> torch.Tensor:
        return shards[global_row // qkv_rows_per_rank][tensor][global_row % qkv_rows_per_rank]

    def column_split(tensor: str, width: int) -> torch.Tensor:
        per_rank = width // tp
        cols = [shards[c // per_rank][tensor][:, c % per_rank] for c in range(width)]
        return torch.stack(cols, dim=1)

    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{layer}."
        out[dst + "input_layernorm.weight"] = shards[0][src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = shards[0][src + "pre_mlp_layernorm.weight"]
        for suffix in ("weight", "bias"):
            name = src + f"self_attention.linear_qkv.{suffix}"
            if name not in shards[0]:
                continue
            q, k, v = [], [], []
            for head in range(nh):
                g, j = divmod(head, per_group)
                q += [qkv_row((g * (per_group + 2) + j) * d + row, name) for row in range(d)]
            for g in range(ng):
                k += [qkv_row((g * (per_group + 2) + per_group) * d + row, name) for row in range(d)]
                v += [qkv_row((g * (per_group + 2) + per_group + 1) * d + row, name) for row in range(d)]
            for proj, rows in (("q", q), ("k", k), ("v", v)):
                out[dst + f"self_attn.{proj}_proj.{suffix}"] = torch.stack(rows)
        if src + "self_attention.q_layernorm.weight" in shards[0]:
            out[dst + "self_attn.q_norm.weight"] = shards[0][src + "self_attention.q_layernorm.weight"]
            out[dst + "self_attn.k_norm.weight"] = shards[0][src + "self_attention.k_layernorm.weight"]
        out[dst + "self_attn.o_proj.weight"] = column_split(src + "self_attention.linear_proj.weight", nh * d)
        fc1, per_rank = src + "mlp.linear_fc1.weight", f // tp
        if fc1 not in shards[0]:  # a MoE layer: rebuilt by rebuild_moe_mlp
            continue
        out[dst + "mlp.gate_proj.weight"] = torch.stack([shards[r // per_rank][fc1][r % per_rank] for r in range(f)])
        out[dst + "mlp.up_proj.weight"] = torch.stack(
            [shards[r // per_rank][fc1][per_rank + r % per_rank] for r in range(f)]
        )
        out[dst + "mlp.down_proj.weight"] = column_split(src + "mlp.linear_fc2.weight", f)

    vocab, vp = case.vocab_size, hm.padded_vocab(case, tp)
    tables = []
    if pre:
        tables.append(("embedding.word_embeddings.weight", "model.embed_tokens.weight"))
    if post:
        out["model.norm.weight"] = shards[0]["decoder.final_layernorm.weight"]
        if not case.tied:
            tables.append(("output_layer.weight", "lm_head.weight"))
    for mname, hname in tables:
        per_rank = vp // tp
        rows = [shards[r // per_rank][mname][r % per_rank] for r in range(vp)]
        assert all(not row.any() for row in rows[vocab:]), f"{mname}: padding rows must be zero"
        out[hname] = torch.stack(rows[:vocab])
    return out


CONVERT_CASES = (
    [
        pytest.param(hm.LLAMA_GQA, tp, id=f"llama-gqa-tp{tp}")
        for tp in (1, 2, 4, 8)  # tp 4, 8: groups < TP
    ]
    + [pytest.param(hm.LLAMA_1KV_TIED, tp, id=f"llama-1kv-tied-tp{tp}") for tp in (1, 2, 4)]
    + [
        pytest.param(hm.QWEN2_BIAS, 2, id="qwen2-bias-tp2"),
        pytest.param(hm.QWEN2_BIAS, 4, id="qwen2-bias-tp4"),
        pytest.param(hm.QWEN3_QKNORM, 2, id="qwen3-qknorm-tp2"),
        pytest.param(hm.QWEN3_QKNORM, 4, id="qwen3-qknorm-tp4"),
        pytest.param(hm.LLAMA_PADDED, 1, id="llama-padded-tp1"),
        pytest.param(hm.LLAMA_PADDED, 2, id="llama-padded-tp2"),
    ]
)


@pytest.fixture(scope="module")
def hf_state() -> dict[str, dict[str, torch.Tensor]]:
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(case: hm.ModelCase) -> dict[str, torch.Tensor]:
        if case.id not in cache:
            cache[case.id] = {k: v.detach().clone() for k, v in hm.build_hf_model(case, seed=3).state_dict().items()}
        return cache[case.id]

    return get  # type: ignore[return-value]


@pytest.mark.parametrize(("case", "tp"), CONVERT_CASES)
def test_every_hf_tensor_is_where_the_layout_says(hf_state, case: hm.ModelCase, tp: int) -> None:
    sd = hf_state(case)
    layers = list(range(case.num_layers))
    shards = shards_for(case, sd, tp, layers, pre=True, post=True)
    want_shapes = expected_local_shapes(case, sd, tp, len(layers), pre=True, post=True)
    for shard in shards:
        assert {k: tuple(v.shape) for k, v in shard.items()} == want_shapes
    rebuilt = rebuild_hf(case, shards, layers, pre=True, post=True)
    expected = {k: v for k, v in sd.items() if not (case.tied and k == "lm_head.weight")}
    assert set(rebuilt) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(rebuilt[name], tensor), name


@pytest.mark.parametrize(("layers", "pre", "post"), [([0, 1], True, False), ([2, 3], False, True), ([1], False, False)])
@pytest.mark.parametrize("tp", [1, 2])
def test_pipeline_chunk_holds_its_layers_under_local_names(
    hf_state, layers: list[int], pre: bool, post: bool, tp: int
) -> None:
    case = hm.LLAMA_4L
    sd = hf_state(case)
    shards = shards_for(case, sd, tp, layers, pre, post)
    for shard in shards:
        assert {k: tuple(v.shape) for k, v in shard.items()} == expected_local_shapes(
            case, sd, tp, len(layers), pre, post
        )
    rebuilt = rebuild_hf(case, shards, layers, pre, post)
    for name, tensor in rebuilt.items():
        assert torch.equal(tensor, sd[name]), name
    assert {int(k.split(".")[2]) for k in rebuilt if k.startswith("model.layers.")} == set(layers)


def test_qkv_interleave_on_a_readable_example() -> None:
    """nh=4, ng=2, d=1, H=1: rows are [q0 q1 k0 v0 | q2 q3 k1 v1]; TP=4 cuts each group in half.

    The gated fc1 (F=4) at TP=2 holds [gate_r ; up_r] on rank r.
    """
    case = hm.ModelCase(
        "tiny",
        "llama",
        dict(
            vocab_size=4,
            hidden_size=1,
            intermediate_size=4,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=1,
        ),
        make_vocab_size_divisible_by=1,
    )
    sd = {
        "model.layers.0.input_layernorm.weight": torch.ones(1),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(1),
        "model.layers.0.self_attn.q_proj.weight": torch.tensor([[10.0], [11.0], [12.0], [13.0]]),
        "model.layers.0.self_attn.k_proj.weight": torch.tensor([[20.0], [21.0]]),
        "model.layers.0.self_attn.v_proj.weight": torch.tensor([[30.0], [31.0]]),
        "model.layers.0.self_attn.o_proj.weight": torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
        "model.layers.0.mlp.gate_proj.weight": torch.tensor([[40.0], [41.0], [42.0], [43.0]]),
        "model.layers.0.mlp.up_proj.weight": torch.tensor([[50.0], [51.0], [52.0], [53.0]]),
        "model.layers.0.mlp.down_proj.weight": torch.tensor([[60.0, 61.0, 62.0, 63.0]]),
    }
    qkv = [
        hf_to_megatron_local(
            sd, case, tp_size=4, tp_rank=r, layers=[0], pre_process=False, post_process=False, padded_vocab=4
        )["decoder.layers.0.self_attention.linear_qkv.weight"]
        .flatten()
        .tolist()
        for r in range(4)
    ]
    assert qkv == [[10.0, 11.0], [20.0, 30.0], [12.0, 13.0], [21.0, 31.0]]
    fc1 = [
        hf_to_megatron_local(
            sd, case, tp_size=2, tp_rank=r, layers=[0], pre_process=False, post_process=False, padded_vocab=4
        )["decoder.layers.0.mlp.linear_fc1.weight"]
        .flatten()
        .tolist()
        for r in range(2)
    ]
    assert fc1 == [[40.0, 41.0, 50.0, 51.0], [42.0, 43.0, 52.0, 53.0]]  # [gate_r ; up_r]


def test_unknown_hf_tensor_is_refused() -> None:
    case = hm.LLAMA_4L
    sd = {k: v.detach() for k, v in hm.build_hf_model(case, seed=0).state_dict().items()}
    sd["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(case.hidden_size)
    hf_to_megatron_local(
        sd, case, tp_size=1, tp_rank=0, layers=[0], pre_process=True, post_process=False, padded_vocab=512
    )
    with pytest.raises(KeyError, match=r"o_proj\.bias"):
        hf_to_megatron_local(
            sd, case, tp_size=1, tp_rank=0, layers=[1], pre_process=True, post_process=False, padded_vocab=512
        )


# --- the hf_models helpers the ground truth rests on ---------------------------------------------


@pytest.mark.parametrize("case", list(hm.CASES.values()), ids=list(hm.CASES))
def test_padded_vocab_rule(case: hm.ModelCase) -> None:
    for tp in (1, 2, 4, 8):
        multiple = case.make_vocab_size_divisible_by * tp
        vp = hm.padded_vocab(case, tp)
        assert vp % multiple == 0 and case.vocab_size <= vp < case.vocab_size + multiple
    assert hm.padded_vocab(hm.LLAMA_PADDED, 2) == 1024 != hm.LLAMA_PADDED.vocab_size
    assert hm.padded_vocab(hm.LLAMA_GQA, 4) == hm.LLAMA_GQA.vocab_size
    assert math.ceil(1000 / 384) * 384 == hm.padded_vocab(hm.LLAMA_PADDED, 3)


def test_cases_round_trip_and_models_are_deterministic() -> None:
    for case in hm.CASES.values():
        assert hm.get_case(case.id) is case
        assert hm.get_case(case.to_dict()) == case
    a, b, c = (hm.build_hf_model(hm.LLAMA_1KV_TIED, seed=s).state_dict() for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
    assert a["lm_head.weight"].data_ptr() == a["model.embed_tokens.weight"].data_ptr()


@pytest.mark.parametrize("case", [hm.LLAMA_1KV_TIED, hm.LLAMA_BF16], ids=["tied-fp32", "bf16"])
def test_perturbed_state_dict_changes_every_element_and_keeps_ties(case: hm.ModelCase) -> None:
    model = hm.build_hf_model(case, seed=1)
    sd = model.state_dict()
    new = hm.perturbed_state_dict(sd, seed=2)
    assert set(new) == set(sd)
    for name, tensor in sd.items():
        assert new[name].dtype == tensor.dtype and new[name].shape == tensor.shape
        assert (new[name] != tensor).all(), name
    if case.tied:
        assert new["lm_head.weight"] is new["model.embed_tokens.weight"]
    model.load_state_dict(new)
    assert all(torch.equal(p, new[n]) for n, p in model.named_parameters())


# --- mixture of experts -------------------------------------------------------------------------
# Megatron-Core 0.16.1 (transformer/moe/moe_layer.py, experts.py, shared_experts.py, router.py): EP rank
# `ep` holds global experts [ep * E/EP, (ep + 1) * E/EP) as local_experts.0.., each an MLP split over
# the expert tensor parallel group (ETP): fc1 rows [gate_r ; up_r] (stride 2), fc2 columns. The shared
# expert is a TP-split MLP; router and shared-expert gate are whole on every rank. HF (transformers 5.x)
# keeps experts fused: gate_up_proj [E, 2F, H] with gate rows first, down_proj [E, H, F].

MOE_LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, 1), (2, 2, 1), (2, 2, 2), (1, 4, 2), (2, 4, 1)]


def moe_shards(
    case: hm.ModelCase, sd: dict, tp: int, ep: int, etp: int | None, layers: list[int], pre: bool, post: bool
):
    """Every (tp_rank, ep_rank, etp_rank) combination's local state dict."""
    etp_size = tp if etp is None else etp
    return {
        (t, e, x): hf_to_megatron_local(
            sd,
            case,
            tp_size=tp,
            tp_rank=t,
            layers=layers,
            pre_process=pre,
            post_process=post,
            padded_vocab=hm.padded_vocab(case, tp),
            ep_size=ep,
            ep_rank=e,
            etp_size=etp,
            etp_rank=x,
        )
        for t in range(tp)
        for e in range(ep)
        for x in range(etp_size)
    }


def expected_moe_shapes(
    case: hm.ModelCase, sd: dict, tp: int, ep: int, etp: int, layers: list[int], pre: bool, post: bool
):
    """Local names and shapes of one rank of a local-spec MoE GPTModel (the attention part as for dense)."""
    out = expected_local_shapes(case, sd, tp, len(layers), pre, post)
    h, fm, e = case.hidden_size, case.moe_ffn_hidden_size, case.num_experts
    for i, layer in enumerate(layers):
        if not case.moe_layers[layer]:
            continue
        p = f"decoder.layers.{i}.mlp."
        del out[p + "linear_fc1.weight"], out[p + "linear_fc2.weight"]
        out[p + "router.weight"] = (e, h)
        for j in range(e // ep):
            out[p + f"experts.local_experts.{j}.linear_fc1.weight"] = (2 * fm // etp, h)
            out[p + f"experts.local_experts.{j}.linear_fc2.weight"] = (h, fm // etp)
        if case.shared_expert_ffn_size:
            fs = case.shared_expert_ffn_size
            out[p + "shared_experts.linear_fc1.weight"] = (2 * fs // tp, h)
            out[p + "shared_experts.linear_fc2.weight"] = (h, fs // tp)
            out[p + "shared_experts.gate_weight"] = (1, h)
    return out


def rebuild_moe_mlp(case: hm.ModelCase, shards: dict, tp: int, ep: int, etp: int, local: int, layer: int) -> dict:
    """HF MoE tensors of one layer, element row by element row from where Megatron keeps them."""
    src, dst = f"decoder.layers.{local}.mlp.", f"model.layers.{layer}.mlp."
    e, fm = case.num_experts, case.moe_ffn_hidden_size
    per_ep, rows_etp = e // ep, fm // etp

    def expert(g: int) -> tuple[int, int]:  # (ep rank, local index)
        return g // per_ep, g % per_ep

    def fc(g: int, etp_rank: int, which: str, tp_rank: int = 0) -> torch.Tensor:
        ep_rank, j = expert(g)
        return shards[(tp_rank, ep_rank, etp_rank)][src + f"experts.local_experts.{j}.linear_{which}.weight"]

    gate_up, down = [], []
    for g in range(e):
        gate = [fc(g, r // rows_etp, "fc1")[r % rows_etp] for r in range(fm)]
        up = [fc(g, r // rows_etp, "fc1")[rows_etp + r % rows_etp] for r in range(fm)]
        gate_up.append(torch.stack(gate + up))
        down.append(torch.stack([fc(g, c // rows_etp, "fc2")[:, c % rows_etp] for c in range(fm)], dim=1))
    out = {
        dst + "gate.weight": shards[(0, 0, 0)][src + "router.weight"],
        dst + "experts.gate_up_proj": torch.stack(gate_up),
        dst + "experts.down_proj": torch.stack(down),
    }
    if case.shared_expert_ffn_size:
        fs = case.shared_expert_ffn_size
        per_tp = fs // tp
        fc1, fc2 = src + "shared_experts.linear_fc1.weight", src + "shared_experts.linear_fc2.weight"
        out[dst + "shared_expert.gate_proj.weight"] = torch.stack(
            [shards[(r // per_tp, 0, 0)][fc1][r % per_tp] for r in range(fs)]
        )
        out[dst + "shared_expert.up_proj.weight"] = torch.stack(
            [shards[(r // per_tp, 0, 0)][fc1][per_tp + r % per_tp] for r in range(fs)]
        )
        out[dst + "shared_expert.down_proj.weight"] = torch.stack(
            [shards[(c // per_tp, 0, 0)][fc2][:, c % per_tp] for c in range(fs)], dim=1
        )
        out[dst + "shared_expert_gate.weight"] = shards[(0, 0, 0)][src + "shared_experts.gate_weight"]
    return out


def assert_independent_of_other_axes(shards: dict) -> None:
    """Routed experts depend only on (ep, etp) ranks; everything else only on the TP rank."""
    for (t, e, x), shard in shards.items():
        for name, tensor in shard.items():
            twin = shards[(0, e, x)][name] if ".experts.local_experts." in name else shards[(t, 0, 0)][name]
            assert torch.equal(tensor, twin), ((t, e, x), name)


@pytest.mark.parametrize("case", [hm.QWEN3_MOE, hm.MIXTRAL, hm.QWEN2_MOE], ids=lambda c: c.id)
@pytest.mark.parametrize(("tp", "ep", "etp"), MOE_LAYOUTS, ids=lambda v: str(v))
def test_every_moe_tensor_is_where_the_layout_says(hf_state, case: hm.ModelCase, tp: int, ep: int, etp) -> None:
    sd = hf_state(case)
    etp_size = tp if etp is None else etp
    layers = list(range(case.num_layers))
    shards = moe_shards(case, sd, tp, ep, etp, layers, pre=True, post=True)
    want = expected_moe_shapes(case, sd, tp, ep, etp_size, layers, pre=True, post=True)
    for shard in shards.values():
        assert {k: tuple(v.shape) for k, v in shard.items()} == want
    assert_independent_of_other_axes(shards)
    rebuilt = rebuild_hf(case, [shards[(t, 0, 0)] for t in range(tp)], layers, pre=True, post=True)
    for i, layer in enumerate(layers):
        if case.moe_layers[layer]:
            rebuilt.update(rebuild_moe_mlp(case, shards, tp, ep, etp_size, i, layer))
    assert set(rebuilt) == set(sd)
    for name, tensor in sd.items():
        assert torch.equal(rebuilt[name], tensor), name


@pytest.mark.parametrize("case", [hm.QWEN3_MOE, hm.QWEN2_MOE], ids=lambda c: c.id)
def test_moe_pipeline_chunks_mix_dense_and_moe_layers(hf_state, case: hm.ModelCase) -> None:
    sd = hf_state(case)
    for layers in ([0, 1], [2, 3]):
        assert {case.moe_layers[layer] for layer in layers} == {True, False}  # both kinds per stage
        shards = moe_shards(case, sd, 2, 2, 1, layers, pre=layers[0] == 0, post=layers[-1] == 3)
        rebuilt = rebuild_hf(case, [shards[(t, 0, 0)] for t in range(2)], layers, layers[0] == 0, layers[-1] == 3)
        for i, layer in enumerate(layers):
            if case.moe_layers[layer]:
                rebuilt.update(rebuild_moe_mlp(case, shards, 2, 2, 1, i, layer))
        assert {int(k.split(".")[2]) for k in rebuilt if k.startswith("model.layers.")} == set(layers)
        for name, tensor in rebuilt.items():
            assert torch.equal(tensor, sd[name]), name


def test_moe_layout_on_a_readable_example() -> None:
    """E=4, F=2, H=1 at EP=2, ETP=2: EP rank 1 holds experts 2, 3 as local 0, 1; ETP rank r holds row r
    of gate and of up ([gate_r ; up_r]) and column r of down."""
    case = hm.ModelCase(
        "tiny-moe",
        "mixtral",
        dict(
            vocab_size=4,
            hidden_size=1,
            intermediate_size=2,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=1,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        make_vocab_size_divisible_by=1,
    )
    gate_up = torch.tensor([[[100.0 * e + 10 * k + r] for k in range(2) for r in range(2)] for e in range(4)])
    sd = {
        "model.layers.0.input_layernorm.weight": torch.ones(1),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(1),
        "model.layers.0.self_attn.q_proj.weight": torch.ones(1, 1),
        "model.layers.0.self_attn.k_proj.weight": torch.ones(1, 1),
        "model.layers.0.self_attn.v_proj.weight": torch.ones(1, 1),
        "model.layers.0.self_attn.o_proj.weight": torch.ones(1, 1),
        "model.layers.0.mlp.gate.weight": torch.tensor([[1.0], [2.0], [3.0], [4.0]]),
        "model.layers.0.mlp.experts.gate_up_proj": gate_up,  # expert e, gate (k=0) / up (k=1), row r
        "model.layers.0.mlp.experts.down_proj": torch.tensor([[[1000.0 * e + c for c in range(2)]] for e in range(4)]),
    }

    def local(ep_rank: int, etp_rank: int) -> dict:
        out = hf_to_megatron_local(
            sd,
            case,
            tp_size=1,
            tp_rank=0,
            layers=[0],
            pre_process=False,
            post_process=False,
            padded_vocab=4,
            ep_size=2,
            ep_rank=ep_rank,
            etp_size=2,
            etp_rank=etp_rank,
        )
        return {k.removeprefix("decoder.layers.0.mlp."): v.flatten().tolist() for k, v in out.items() if ".mlp." in k}

    assert local(1, 1) == {
        "router.weight": [1.0, 2.0, 3.0, 4.0],
        "experts.local_experts.0.linear_fc1.weight": [201.0, 211.0],  # expert 2: gate row 1, up row 1
        "experts.local_experts.0.linear_fc2.weight": [2001.0],
        "experts.local_experts.1.linear_fc1.weight": [301.0, 311.0],
        "experts.local_experts.1.linear_fc2.weight": [3001.0],
    }
    assert local(0, 0)["experts.local_experts.1.linear_fc1.weight"] == [100.0, 110.0]
    with pytest.raises(ValueError, match="4 experts do not split over EP=3"):
        hf_to_megatron_local(
            sd,
            case,
            tp_size=1,
            tp_rank=0,
            layers=[0],
            pre_process=False,
            post_process=False,
            padded_vocab=4,
            ep_size=3,
            ep_rank=0,
            etp_size=1,
            etp_rank=0,
        )


def test_moe_case_shapes_follow_hf_rules() -> None:
    assert hm.QWEN3_MOE.moe_layers == (True, False, False, True)  # mlp_only_layers=[1, 2]
    assert hm.QWEN2_MOE.moe_layers == (False, True, False, True)  # decoder_sparse_step=2
    assert hm.MIXTRAL.moe_layers == (True,) * 4
    assert (hm.MIXTRAL.num_experts, hm.MIXTRAL.moe_ffn_hidden_size, hm.MIXTRAL.norm_topk_prob) == (4, 32, True)
    assert (hm.QWEN2_MOE.shared_expert_ffn_size, hm.QWEN2_MOE.norm_topk_prob) == (48, False)
    assert not hm.LLAMA_GQA.is_moe and hm.LLAMA_GQA.num_experts == 0
    for case in (hm.QWEN3_MOE, hm.MIXTRAL, hm.QWEN2_MOE):
        model = hm.build_hf_model(case, seed=1)
        for i, moe in enumerate(case.moe_layers):
            assert hasattr(model.model.layers[i].mlp, "experts") == moe, (case.id, i)
