"""The planner on hand-computed cases: which bytes an engine rank reads from which trainer rank."""

from __future__ import annotations

import itertools

import pytest

from refit.errors import LayoutError, ModelMismatchError
from refit.plan.planner import plan_refit
from refit.plan.targets import EngineLayout
from refit.types import ModelMeta, ParallelCoords, Region, Role, SourceRecord, TensorDesc

H, NH, NG, D, F, VP = 16, 8, 2, 4, 32, 64  # hidden, heads, query groups, head dim, ffn, padded vocab
QKV_ROWS = (NH + 2 * NG) * D  # 48
ITEM = 4  # float32

META = ModelMeta(
    architecture="llama",
    num_layers=1,
    hidden_size=H,
    num_attention_heads=NH,
    num_query_groups=NG,
    kv_channels=D,
    ffn_hidden_size=F,
    padded_vocab_size=VP,
    vocab_size=60,
)

# name -> (role, global shape, partition dim, stride)
TENSORS = {
    "embedding.word_embeddings.weight": (Role.VOCAB_PARALLEL, (VP, H), 0, 1),
    "decoder.layers.0.input_layernorm.weight": (Role.REPLICATED, (H,), -1, 1),
    "decoder.layers.0.self_attention.linear_qkv.weight": (Role.QKV_COLUMN, (QKV_ROWS, H), 0, 1),
    "decoder.layers.0.self_attention.linear_proj.weight": (Role.ROW, (H, NH * D), 1, 1),
    "decoder.layers.0.pre_mlp_layernorm.weight": (Role.REPLICATED, (H,), -1, 1),
    "decoder.layers.0.mlp.linear_fc1.weight": (Role.GATED_MLP_COLUMN, (2 * F, H), 0, 2),
    "decoder.layers.0.mlp.linear_fc2.weight": (Role.ROW, (H, F), 1, 1),
    "decoder.final_layernorm.weight": (Role.REPLICATED, (H,), -1, 1),
    "output_layer.weight": (Role.VOCAB_PARALLEL, (VP, H), 0, 1),
}


def source(rank: int, tp_rank: int, tp: int, dp_rank: int = 0, dp: int = 1) -> SourceRecord:
    """One trainer rank with every shard packed back to back in one region, in TENSORS order."""
    descs, offset = [], 0
    for name, (role, shape, dim, stride) in TENSORS.items():
        assert (dim, stride) == (role.partition_dim, role.partition_stride), name
        desc = TensorDesc.shard(
            name=name, role=role, dtype="float32", global_shape=shape, rank=tp_rank, size=tp, byte_offset=offset
        )
        descs.append(desc)
        offset += desc.nbytes
    return SourceRecord(
        rank=rank,
        coords=ParallelCoords(tp_rank=tp_rank, tp_size=tp, dp_rank=dp_rank, dp_size=dp),
        agent_name=f"agent-{rank}",
        agent_metadata=b"md",
        regions=(Region(index=0, addr=1 << 20, nbytes=offset),),
        tensors=tuple(descs),
    )


def offset_of(src: SourceRecord, name: str) -> int:
    return next(t.byte_offset for t in src.tensors if t.name == name)


def pieces_of(plan, tensor):
    return sorted((p for p in plan.pieces if p.tensor.endswith(tensor)), key=lambda p: p.start)


@pytest.fixture
def tp2() -> list[SourceRecord]:
    return [source(0, 0, 2), source(1, 1, 2)]


def test_engine_tp2_rank0_reads_its_whole_query_group_from_trainer_rank0(tp2: list[SourceRecord]) -> None:
    plan = plan_refit(model=META, sources=tp2, layout=EngineLayout(tp_rank=0, tp_size=2))
    (qkv,) = pieces_of(plan, "linear_qkv.weight")
    assert (qkv.rank, qkv.start, qkv.stop, qkv.count) == (0, 0, 24, 1)
    assert qkv.remote_offset == offset_of(tp2[0], "decoder.layers.0.self_attention.linear_qkv.weight")
    assert qkv.block_bytes == 24 * H * ITEM
    targets = {t.hf_name.rsplit(".", 2)[-2]: t.rows for t in plan.targets if "self_attn" in t.hf_name}
    assert targets["q_proj"] == ((0, 16),)  # heads 0-3 of group 0
    assert targets["k_proj"] == ((16, 20),)
    assert targets["v_proj"] == ((20, 24),)
    assert targets["o_proj"] == ((0, 16),)  # columns, read whole from rank 0
    (proj,) = pieces_of(plan, "linear_proj.weight")
    assert (proj.rank, proj.count, proj.block_bytes) == (0, 1, H * 16 * ITEM)


def test_engine_tp4_rank3_slices_inside_trainer_shards(tp2: list[SourceRecord]) -> None:
    plan = plan_refit(model=META, sources=tp2, layout=EngineLayout(tp_rank=3, tp_size=4))
    # q heads 6,7 = group 1 slots 2,3 -> rows 32..40; one KV group shared by ranks 2,3 -> k 40..44, v 44..48.
    (qkv,) = pieces_of(plan, "linear_qkv.weight")
    assert (qkv.rank, qkv.start, qkv.stop) == (1, 32, 48)
    assert qkv.remote_offset == offset_of(tp2[1], "decoder.layers.0.self_attention.linear_qkv.weight") + 8 * H * ITEM
    # Row-parallel: engine columns 24..32 are trainer rank 1's columns 8..16: 16 strided rows.
    (proj,) = pieces_of(plan, "linear_proj.weight")
    assert (proj.rank, proj.start, proj.stop, proj.count) == (1, 24, 32, H)
    assert proj.block_bytes == 8 * ITEM and proj.remote_stride == 16 * ITEM
    assert proj.remote_offset == offset_of(tp2[1], "decoder.layers.0.self_attention.linear_proj.weight") + 8 * ITEM
    # Gated fc1: gate rows 24..32 and up rows 32+24..32+32, both in trainer rank 1's [gate_1; up_1].
    fc1 = pieces_of(plan, "linear_fc1.weight")
    base = offset_of(tp2[1], "decoder.layers.0.mlp.linear_fc1.weight")
    assert [(p.rank, p.start, p.stop, p.remote_offset - base) for p in fc1] == [
        (1, 24, 32, 8 * H * ITEM),
        (1, 56, 64, 24 * H * ITEM),
    ]


def test_engine_tp1_drops_vocab_padding_and_reads_every_shard_whole(tp2: list[SourceRecord]) -> None:
    plan = plan_refit(model=META, sources=tp2, layout=EngineLayout(tp_rank=0, tp_size=1, vocab_size=60))
    emb = pieces_of(plan, "word_embeddings.weight")
    assert [(p.rank, p.start, p.stop) for p in emb] == [(0, 0, 32), (1, 32, 60)]  # rows 60..64 never read
    assert {t.hf_name: t.shape for t in plan.targets}["model.embed_tokens.weight"] == (60, H)
    # Every partitioned tensor comes whole from both ranks, and nothing is read twice.
    shard_bytes = sum(t.nbytes for t in tp2[0].tensors)
    replicated = 3 * H * ITEM
    padding = 2 * 4 * H * ITEM  # four padded rows of the embedding and of the output layer
    assert plan.total_bytes == 2 * shard_bytes - replicated - padding


def test_engine_tp2_replicates_kv_heads_when_fewer_groups_than_ranks() -> None:
    meta = ModelMeta(**{**{f: getattr(META, f) for f in META.__slots__}, "num_query_groups": 1})
    plan = plan_refit(model=meta, sources=[_one_group_source()], layout=EngineLayout(tp_rank=1, tp_size=2))
    rows = {t.hf_name.rsplit(".", 2)[-2]: t.rows for t in plan.targets if "proj" in t.hf_name and "self" in t.hf_name}
    assert rows["q_proj"] == ((16, 32),)  # heads 4..7 of the single group
    assert rows["k_proj"] == ((32, 36),) and rows["v_proj"] == ((36, 40),)


def _one_group_source() -> SourceRecord:
    descs = [
        TensorDesc(
            name="decoder.layers.0.self_attention.linear_qkv.weight", role=Role.QKV_COLUMN, dtype="float32",
            local_shape=((NH + 2) * D, H), global_shape=((NH + 2) * D, H), partition_dim=0,
        ),
        TensorDesc(
            name="decoder.layers.0.self_attention.linear_proj.weight", role=Role.ROW, dtype="float32",
            local_shape=(H, NH * D), global_shape=(H, NH * D), partition_dim=1, byte_offset=(NH + 2) * D * H * ITEM,
        ),
    ]  # fmt: skip
    size = sum(d.nbytes for d in descs)
    return SourceRecord(
        rank=0, coords=ParallelCoords(), agent_name="a", agent_metadata=b"", tensors=tuple(descs),
        regions=(Region(index=0, addr=4096, nbytes=size),),
    )  # fmt: skip


def test_data_parallel_replicas_share_the_load_and_engine_ranks_rotate() -> None:
    dp2 = [source(0, 0, 1, dp_rank=0, dp=2), source(1, 0, 1, dp_rank=1, dp=2)]
    plan0 = plan_refit(model=META, sources=dp2, layout=EngineLayout(vocab_size=60), stripe=0)
    plan1 = plan_refit(model=META, sources=dp2, layout=EngineLayout(vocab_size=60), stripe=1)
    total = plan0.total_bytes
    assert set(plan0.bytes_by_rank) == {0, 1}
    assert all(b <= 0.6 * total for b in plan0.bytes_by_rank.values())
    # The other engine replica takes the opposite halves.
    assert plan0.bytes_by_rank[0] == plan1.bytes_by_rank[1]
    # Each replica serves one contiguous run, so each source is few descriptors, not one per tensor.
    for plan in (plan0, plan1):
        for rank in (0, 1):
            mine = sorted((p for p in plan.pieces if p.rank == rank), key=lambda p: p.local_offset)
            gaps = sum(1 for a, b in itertools.pairwise(mine) if a.remote_offset + a.nbytes != b.remote_offset)
            assert gaps <= 1


def test_missing_pipeline_stage_is_named() -> None:
    src = source(0, 0, 1)
    partial = SourceRecord(
        rank=0, coords=src.coords, agent_name="a", agent_metadata=b"", regions=src.regions,
        tensors=tuple(t for t in src.tensors if "proj" not in t.name),
    )  # fmt: skip
    plan = plan_refit(model=META, sources=[partial], layout=EngineLayout(vocab_size=60))
    assert not any("o_proj" in t.hf_name for t in plan.targets)  # the engine check then reports it missing
    other = [source(0, 0, 2)]  # only TP rank 0 of two: half of every split tensor is unpublished
    with pytest.raises(LayoutError, match="no trainer rank publishes rows"):
        plan_refit(model=META, sources=other, layout=EngineLayout(vocab_size=60))


def test_engine_tp_that_cannot_split_the_model_is_refused(tp2: list[SourceRecord]) -> None:
    with pytest.raises(ModelMismatchError, match="not divisible by engine TP size 3"):
        plan_refit(model=META, sources=tp2, layout=EngineLayout(tp_rank=0, tp_size=3))
