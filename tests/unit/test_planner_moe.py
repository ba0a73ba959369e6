"""The planner's Megatron naming scheme and MoE expert roles, on hand-computed cases: which bytes from which rank."""

from __future__ import annotations

import dataclasses

import pytest

from refit.errors import ConfigError, ModelMismatchError
from refit.plan.naming import expert_index
from refit.plan.planner import Plan, plan_refit
from refit.plan.targets import EngineLayout, Scheme
from refit.types import ModelMeta, ParallelCoords, Region, Role, SourceRecord, TensorDesc

H, NH, NG, D, F, VP, E, FE = 16, 8, 4, 4, 32, 64, 4, 8  # ..., padded vocab, experts, expert ffn
QKV_ROWS = (NH + 2 * NG) * D  # 64: four groups of 16 rows (2 q heads, k, v)
ITEM = 2  # bfloat16

META = ModelMeta(
    architecture="deepseek_v3", num_layers=1, hidden_size=H, num_attention_heads=NH, num_query_groups=NG,
    kv_channels=D, ffn_hidden_size=F, padded_vocab_size=VP, vocab_size=60, num_experts=E, moe_ffn_hidden_size=FE,
    params_dtype="bfloat16",
)  # fmt: skip

L = "decoder.layers.0."
# name -> (role, global shape, partition dim, stride); experts are appended per EP rank below.
DENSE = {
    "embedding.word_embeddings.weight": (Role.VOCAB_PARALLEL, (VP, H), 0, 1),
    L + "self_attention.linear_qkv.weight": (Role.QKV_COLUMN, (QKV_ROWS, H), 0, 1),
    L + "self_attention.linear_proj.weight": (Role.ROW, (H, NH * D), 1, 1),
    L + "pre_mlp_layernorm.weight": (Role.REPLICATED, (H,), -1, 1),
    L + "mlp.router.weight": (Role.REPLICATED, (E, H), -1, 1),
    L + "mlp.shared_experts.linear_fc1.weight": (Role.GATED_MLP_COLUMN, (2 * F, H), 0, 2),
    L + "mlp.shared_experts.linear_fc2.weight": (Role.ROW, (H, F), 1, 1),
}


DENSE_SPLIT = (Role.VOCAB_PARALLEL, Role.QKV_COLUMN, Role.ROW, Role.GATED_MLP_COLUMN)


def fc1(e: int) -> str:
    return f"{L}mlp.experts.linear_fc1.weight{e}"


def fc2(e: int) -> str:
    return f"{L}mlp.experts.linear_fc2.weight{e}"


def _desc(name: str, role: Role, shape: tuple[int, ...], dim: int, stride: int, rank: int, size: int, at: int):
    assert (dim, stride) == (role.partition_dim, role.partition_stride), name
    return TensorDesc.shard(
        name=name, role=role, dtype="bfloat16", global_shape=shape, rank=rank, size=size, byte_offset=at
    )


def source(
    rank: int,
    *,
    tp: tuple[int, int] = (0, 1),
    ep: tuple[int, int] = (0, 1),
    etp: tuple[int, int] = (0, 1),
    experts: int = E,
):
    """A trainer rank: dense shards of TP rank tp[0] of tp[1], then the experts of its EP rank, packed."""
    per = experts // ep[1]
    specs = [(n, *spec, *tp) for n, spec in DENSE.items()]
    for e in range(ep[0] * per, (ep[0] + 1) * per):
        specs += [
            (fc1(e), Role.EXPERT_GATED_COLUMN, (2 * FE, H), 0, 2, *etp),
            (fc2(e), Role.EXPERT_ROW, (H, FE), 1, 1, *etp),
        ]
    descs, at = [], 0
    for name, role, shape, dim, stride, r, size in specs:
        descs.append(_desc(name, role, shape, dim, stride, r, size, at))
        at += descs[-1].nbytes
    return SourceRecord(
        rank=rank, coords=ParallelCoords(tp_rank=tp[0], tp_size=tp[1], ep_rank=ep[0], ep_size=ep[1]),
        agent_name=f"a{rank}", agent_metadata=b"", regions=(Region(index=0, addr=4096, nbytes=at),),
        tensors=tuple(descs),
    )  # fmt: skip


def offset_of(src: SourceRecord, name: str) -> int:
    return next(t.byte_offset for t in src.tensors if t.name == name)


def pieces_of(plan: Plan, name: str) -> list[tuple[int, int, int, int, int]]:
    """(rank, start, stop, remote offset, count) of every piece of `name`, by start row."""
    return sorted((p.rank, p.start, p.stop, p.remote_offset, p.count) for p in plan.pieces if p.tensor == name)


def megatron(**kw: int) -> EngineLayout:
    return EngineLayout(scheme="megatron", **kw)


def test_megatron_scheme_keeps_names_and_splits_qkv_by_whole_query_groups() -> None:
    tp1 = [source(0)]
    plan = plan_refit(model=META, sources=tp1, layout=megatron(tp_rank=1, tp_size=2))
    qkv = L + "self_attention.linear_qkv.weight"
    targets = {t.hf_name: t for t in plan.targets}
    assert targets[qkv].rows == ((32, 64),) and targets[qkv].shape == (32, H)  # groups 2, 3: q heads 4..7, k, v
    assert pieces_of(plan, qkv) == [(0, 32, 64, offset_of(tp1[0], qkv) + 32 * H * ITEM, 1)]
    assert all(t.hf_name == t.source for t in plan.targets)


def test_megatron_scheme_gated_fc1_is_one_target_of_two_intervals() -> None:
    tp2 = [source(0, tp=(0, 2)), source(1, tp=(1, 2))]
    name = L + "mlp.shared_experts.linear_fc1.weight"
    plan = plan_refit(model=META, sources=tp2, layout=megatron(tp_rank=3, tp_size=4))
    (target,) = [t for t in plan.targets if t.source == name]
    assert target.rows == ((24, 32), (56, 64)) and target.shape == (16, H)  # [gate_3; up_3]
    base = offset_of(tp2[1], name)  # trainer rank 1 holds [gate rows 16..32; up rows 48..64]
    assert pieces_of(plan, name) == [(1, 24, 32, base + 8 * H * ITEM, 1), (1, 56, 64, base + 24 * H * ITEM, 1)]


def test_megatron_scheme_row_vocab_and_replicated_tensors() -> None:
    tp2 = [source(0, tp=(0, 2)), source(1, tp=(1, 2))]
    plan = plan_refit(model=META, sources=tp2, layout=megatron(tp_rank=3, tp_size=4), stripe=0)
    proj = L + "self_attention.linear_proj.weight"
    # Columns 24..32 are trainer rank 1's local columns 8..16: H strided blocks of 8 elements.
    assert pieces_of(plan, proj) == [(1, 24, 32, offset_of(tp2[1], proj) + 8 * ITEM, H)]
    emb = "embedding.word_embeddings.weight"  # even rows of the padded table, padding included
    assert pieces_of(plan, emb) == [(1, 48, 64, offset_of(tp2[1], emb) + 16 * H * ITEM, 1)]
    router = next(p for p in plan.pieces if p.tensor == L + "mlp.router.weight")
    assert router.dim is None and router.nbytes == E * H * ITEM


def test_megatron_scheme_refuses_engine_tp_beyond_query_groups() -> None:
    with pytest.raises(ModelMismatchError, match="num_query_groups"):
        plan_refit(model=META, sources=[source(0)], layout=megatron(tp_rank=0, tp_size=8))


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_scheme_engine_tp_group_reads_each_split_byte_once(tp: int) -> None:
    srcs = [source(0, tp=(0, 2)), source(1, tp=(1, 2))]
    plans = [plan_refit(model=META, sources=srcs, layout=megatron(tp_rank=t, tp_size=tp)) for t in range(tp)]
    replicated = sum(d.nbytes for d in srcs[0].tensors if d.role is Role.REPLICATED)
    experts = sum(d.nbytes for d in srcs[0].tensors if ".mlp.experts." in d.name)  # whole on both ranks (ETP1)
    split = sum(d.nbytes for s in srcs for d in s.tensors if d.role in DENSE_SPLIT) + experts
    assert sum(p.total_bytes for p in plans) == split + tp * replicated


def test_engine_ep_rank_reads_only_its_experts_from_the_ranks_that_hold_them() -> None:
    # Trainer EP2 x EDP2: ranks 0 and 2 hold experts 0-1, ranks 1 and 3 hold experts 2-3.
    srcs = [source(r, ep=(r % 2, 2)) for r in range(4)]
    plan = plan_refit(model=META, sources=srcs, layout=megatron(ep_rank=1, ep_size=2), stripe=0)
    experts = {expert_index(t.source) for t in plan.targets if ".mlp.experts." in t.source}
    assert experts == {2, 3}
    expert_pieces = [p for p in plan.pieces if ".mlp.experts." in p.tensor]
    assert {p.rank for p in expert_pieces} == {1, 3}  # striped over the two copies
    assert sum(p.nbytes for p in expert_pieces) == 2 * 3 * FE * H * ITEM  # whole experts: fc1 and fc2
    fc2_target = next(t for t in plan.targets if t.source == fc2(3))
    assert fc2_target.rows == ((0, FE),) and fc2_target.shape == (H, FE)


def test_engine_without_ep_splits_each_expert_by_its_tp() -> None:
    srcs = [source(0)]
    plan = plan_refit(model=META, sources=srcs, layout=megatron(tp_rank=1, tp_size=2))
    assert {expert_index(t.source) for t in plan.targets if ".mlp.experts." in t.source} == set(range(E))
    # fc1 of expert 2: [gate rows 4..8; up rows 12..16]; fc2: columns 4..8, H strided blocks.
    base1, base2 = offset_of(srcs[0], fc1(2)), offset_of(srcs[0], fc2(2))
    assert pieces_of(plan, fc1(2)) == [(0, 4, 8, base1 + 4 * H * ITEM, 1), (0, 12, 16, base1 + 12 * H * ITEM, 1)]
    assert pieces_of(plan, fc2(2)) == [(0, 4, 8, base2 + 4 * ITEM, H)]


def test_engine_expert_tp_gathers_trainer_expert_tp_shards() -> None:
    # Trainer ETP2: each expert's fc1 is [gate_r; up_r] over two ranks; engine EP2 takes experts whole.
    srcs = [source(0, tp=(0, 2), etp=(0, 2)), source(1, tp=(1, 2), etp=(1, 2))]
    plan = plan_refit(model=META, sources=srcs, layout=megatron(tp_rank=0, tp_size=2, ep_rank=0, ep_size=2))
    (target,) = [t for t in plan.targets if t.source == fc1(1)]
    assert target.rows == ((0, 2 * FE),) and target.shape == (2 * FE, H)
    b0, b1 = offset_of(srcs[0], fc1(1)), offset_of(srcs[1], fc1(1))
    assert pieces_of(plan, fc1(1)) == [
        (0, 0, 4, b0, 1),  # gate rows of trainer ETP rank 0
        (0, 8, 12, b0 + 4 * H * ITEM, 1),  # its up rows
        (1, 4, 8, b1, 1),
        (1, 12, 16, b1 + 4 * H * ITEM, 1),
    ]


def test_hf_scheme_names_experts_router_and_shared_experts() -> None:
    plan = plan_refit(model=META, sources=[source(0)], layout=EngineLayout(ep_rank=1, ep_size=2))
    names = {t.hf_name for t in plan.targets}
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in names
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.0.mlp.experts.1.up_proj.weight" not in names  # EP rank 0's expert
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_experts.up_proj.weight"} <= names


def test_engine_layout_rejects_unknown_scheme_and_bad_positions() -> None:
    assert EngineLayout(scheme="megatron").scheme is Scheme.MEGATRON
    with pytest.raises(ConfigError, match="scheme"):
        EngineLayout(scheme="sglang")
    with pytest.raises(ConfigError, match="ep_rank"):
        EngineLayout(ep_rank=2, ep_size=2)
    with pytest.raises(ModelMismatchError, match="engine EP size 3"):
        plan_refit(model=META, sources=[source(0)], layout=megatron(ep_rank=0, ep_size=3))


def test_expert_index_reads_both_megatron_expert_namings() -> None:
    assert expert_index(fc1(17)) == 17
    assert expert_index(L + "mlp.experts.local_experts.5.linear_fc2.weight") == 5


@pytest.mark.parametrize("scheme", ["megatron", "hf"])
@pytest.mark.parametrize("engine_ep", [4, 8])
def test_engine_ep_4_and_8_read_their_experts_whole_striped_over_the_edp_replicas(engine_ep: int, scheme: str) -> None:
    # 8 experts; trainer EP2 x EDP2: ranks 0 and 2 hold experts 0-3, ranks 1 and 3 hold experts 4-7.
    model = dataclasses.replace(META, num_experts=8)
    srcs = [source(r, ep=(r % 2, 2), experts=8) for r in range(4)]
    per_engine_rank = 8 // engine_ep
    for ep_rank in range(engine_ep):
        owned = set(range(ep_rank * per_engine_rank, (ep_rank + 1) * per_engine_rank))
        replicas = {r for r in range(4) if r % 2 == min(owned) // 4}  # the EDP copies of the owning EP rank
        by_stripe = {}
        for stripe in (0, 1):
            layout = EngineLayout(scheme=scheme, ep_rank=ep_rank, ep_size=engine_ep)
            plan = plan_refit(model=model, sources=srcs, layout=layout, stripe=stripe)
            assert {expert_index(t.source) for t in plan.targets if ".mlp.experts." in t.source} == owned
            pieces = [p for p in plan.pieces if ".mlp.experts." in p.tensor]
            assert {p.rank for p in pieces} == replicas  # both copies serve, and nobody else
            # Whole experts, each byte once: fc1 [2FE, H] and fc2 [H, FE], at the offset the trainer published.
            assert sum(p.nbytes for p in pieces) == per_engine_rank * 3 * FE * H * ITEM
            for p in pieces:  # fc1 rows (gate, then up) or fc2 columns, at the offset the trainer published
                row = H * ITEM if "linear_fc1" in p.tensor else ITEM
                assert p.remote_offset == offset_of(srcs[p.rank], p.tensor) + p.start * row, p
            by_stripe[stripe] = {p.tensor: p.rank for p in pieces}
        # Another stripe (another engine rank's rotation) takes each run from the other replica.
        assert all(by_stripe[0][t] != by_stripe[1][t] for t in by_stripe[0])
    if scheme == "hf":
        names = {t.hf_name for t in plan.targets}
        assert "model.layers.0.mlp.experts.7.up_proj.weight" in names  # the last EP rank's expert
        assert "model.layers.0.mlp.experts.0.up_proj.weight" not in names
