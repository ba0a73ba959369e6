"""Row-parallel shards published as column blocks (`refit.trainer.blocks`): the descriptor transform,
the tensor views, and the real planner and assembler reading them.

Trainer regions are built by hand here (each shard cut from a random global tensor and stored as
`k` column blocks with `torch.cat`), the plan's reads are carried out by copying bytes, as the
transport would, and every engine tensor is compared with the slice of the global tensor it must
hold, computed straight from the engine's TP rank.
"""

from __future__ import annotations

import pytest
import torch

from refit.errors import ConfigError
from refit.plan.assemble import assemble
from refit.plan.planner import Plan, plan_refit
from refit.plan.targets import EngineLayout, Scheme
from refit.trainer import blocks, memory
from refit.trainer.blocks import ColumnBlocks
from refit.types import ModelMeta, ParallelCoords, Region, Role, SourceRecord, TensorDesc

H, NH, NG, D, F, E, FE = 16, 8, 2, 8, 64, 2, 32  # hidden, heads, groups, head dim, ffn, experts, expert ffn
L = "decoder.layers.0."
META = ModelMeta(
    architecture="qwen3_moe", num_layers=1, hidden_size=H, num_attention_heads=NH, num_query_groups=NG,
    kv_channels=D, ffn_hidden_size=F, padded_vocab_size=64, vocab_size=64, num_experts=E, moe_ffn_hidden_size=FE,
)  # fmt: skip


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# Row-parallel tensors (dim 1), global: attention output, a dense fc2, two experts' fc2.
ROWS = {
    L + "self_attention.linear_proj.weight": (Role.ROW, _rand(H, NH * D, seed=1)),
    L + "mlp.linear_fc2.weight": (Role.ROW, _rand(H, F, seed=2)),
    **{f"{L}mlp.experts.linear_fc2.weight{e}": (Role.EXPERT_ROW, _rand(H, FE, seed=3 + e)) for e in range(E)},
}
# Tensors that are never blocked, published beside them.
OTHERS = {
    "embedding.word_embeddings.weight": (Role.VOCAB_PARALLEL, _rand(64, H, seed=10)),
    L + "input_layernorm.weight": (Role.REPLICATED, _rand(H, seed=11)),
    L + "mlp.linear_fc1.weight": (Role.GATED_MLP_COLUMN, _rand(2 * F, H, seed=12)),
}


def _cut(desc: TensorDesc, tensor: torch.Tensor) -> torch.Tensor:
    """The shard `desc` describes, cut from the global tensor by hand (stride-2 parts concatenated)."""
    if desc.partition_dim == -1:
        return tensor
    d, s = desc.partition_dim, desc.partition_stride
    rows = desc.local_shape[d] // s
    return torch.cat([part.narrow(d, desc.offset, rows) for part in tensor.chunk(s, dim=d)], dim=d)


def _blocked_bytes(shard: torch.Tensor, k: int) -> torch.Tensor:
    """`k` column blocks of a 2-D shard, block after block, each a dense [rows, W/k] tensor."""
    w = shard.shape[1] // k
    return torch.cat([shard[:, j * w : (j + 1) * w].contiguous().view(-1) for j in range(k)]).view(torch.uint8)


def trainer(tensors: dict, *, tp: int, k: int) -> tuple[list[SourceRecord], dict[int, torch.Tensor]]:
    """TP ranks publishing `tensors`, row-parallel ones as `k` column blocks; records and region bytes."""
    sources, regions = [], {}
    for rank in range(tp):
        descs, chunks, at = [], [], 0
        for name, (role, tensor) in tensors.items():
            desc = TensorDesc.shard(name=name, role=role, dtype="float32", global_shape=tuple(tensor.shape),
                                    rank=rank, size=tp, byte_offset=at)  # fmt: skip
            shard = _cut(desc, tensor)
            n = blocks.block_count(shape=desc.local_shape, partition_dim=desc.partition_dim,
                                   partition_stride=desc.partition_stride, requested=k)  # fmt: skip
            descs.extend(blocks.split(desc, n))
            chunks.append(_blocked_bytes(shard, n) if n > 1 else shard.contiguous().view(-1).view(torch.uint8))
            at += desc.nbytes
        regions[rank] = torch.cat(chunks)
        sources.append(SourceRecord(
            rank=rank, coords=ParallelCoords(tp_rank=rank, tp_size=tp), agent_name=f"t{rank}", agent_metadata=b"",
            regions=(Region(index=0, addr=1 << 30, nbytes=at),), tensors=tuple(descs),
        ))  # fmt: skip
    return sources, regions


def stage(plan: Plan, regions: dict[int, torch.Tensor]) -> torch.Tensor:
    """Carry out the plan's reads: block i of a read comes from remote_offset + i * remote_stride."""
    staging = torch.full((plan.staging_bytes,), 0xFF, dtype=torch.uint8)
    for r in plan.reads:
        for i in range(r.count):
            src, dst = r.remote_offset + i * r.remote_stride, r.local_offset + i * r.block_bytes
            staging[dst : dst + r.block_bytes] = regions[r.rank][src : src + r.block_bytes]
    return staging


# -- the transform --------------------------------------------------------------------------------


def test_block_count_takes_inner_splits_only_and_the_largest_divisor() -> None:
    def count(shape: tuple[int, ...], dim: int, stride: int = 1, k: int = 4) -> int:
        return blocks.block_count(shape=shape, partition_dim=dim, partition_stride=stride, requested=k)

    assert count((16, 64), 1) == 4
    assert count((16, 64), 1, k=1) == 1
    assert count((16, 64), 0) == 1  # column-parallel rows are already contiguous
    assert count((16,), -1) == 1  # replicated
    assert count((1, 64), 1) == 1  # one run: nothing is strided
    assert count((16, 64), 1, stride=2) == 1  # parts already interleaved: published as they are
    assert count((16, 24), 1, k=16) == 12  # 16 does not divide 24: its largest divisor <= 16
    assert count((16, 7), 1, k=4) == 1  # a prime width has no divisor but 1
    assert count((4, 3, 10), 2, k=4) == 2


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "4", None])
def test_row_blocks_must_be_an_int_of_at_least_one(bad: object) -> None:
    with pytest.raises(ConfigError, match="row_blocks"):
        blocks.check_requested(bad)


@pytest.mark.parametrize("bad", [0, 1.5, False])
def test_publisher_refuses_bad_row_blocks_before_any_side_effect(bad: object) -> None:
    from refit import Publisher

    # No torch.distributed, no catalog at that address: the argument is refused before either is needed.
    with pytest.raises(ConfigError, match="row_blocks"):
        Publisher(catalog="127.0.0.1:1", model=torch.nn.Linear(2, 2), row_blocks=bad)


def test_split_gives_each_block_its_columns_and_bytes() -> None:
    desc = TensorDesc.shard(name="w", role=Role.ROW, dtype="bfloat16", global_shape=(16, 64), rank=1, size=2,
                            byte_offset=512)  # fmt: skip
    got = blocks.split(desc, 4)
    assert [(d.offset, d.local_shape, d.byte_offset) for d in got] == [
        (32 + 8 * j, (16, 8), 512 + j * 16 * 8 * 2) for j in range(4)
    ]
    assert {(d.name, d.role, d.global_shape, d.partition_dim, d.partition_stride) for d in got} == {
        ("w", Role.ROW, (16, 64), 1, 1)
    }
    assert blocks.split(desc, 1) == (desc,)
    with pytest.raises(ConfigError):
        blocks.split(desc, 3)  # 32 local columns do not cut into 3 blocks
    column = TensorDesc.shard(name="c", role=Role.COLUMN, dtype="bfloat16", global_shape=(16, 64))
    with pytest.raises(ConfigError):
        blocks.split(column, 2)


@pytest.mark.parametrize(("shape", "dim", "k"), [((16, 64), 1, 4), ((6, 12), 1, 3), ((2, 3, 8), 2, 2)])
def test_copy_blocked_stores_the_blocks_back_to_back(shape: tuple[int, ...], dim: int, k: int) -> None:
    src = torch.arange(1, 1 + torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    dest = torch.zeros(shape)
    blocks.copy_blocked(dest, src, ColumnBlocks(dim=dim, count=k))
    w = shape[dim] // k
    want = torch.cat([src.narrow(dim, j * w, w).contiguous().view(-1) for j in range(k)])
    assert torch.equal(dest.view(-1), want)
    plain = torch.zeros(shape)
    blocks.copy_blocked(plain, src, None)
    assert torch.equal(plain, src)


# -- planner and assembler over blocked shards -------------------------------------------------------


def _columns(name: str, tensor: torch.Tensor, t: int, tp: int) -> torch.Tensor:
    w = tensor.shape[1] // tp
    return tensor[:, t * w : (t + 1) * w]


@pytest.mark.parametrize("trainer_tp", [1, 2])
@pytest.mark.parametrize("k", [4, 8])
@pytest.mark.parametrize("engine_tp", [2, 4, 8])
def test_engine_rank_reads_its_columns_of_each_shard_in_one_descriptor(trainer_tp: int, k: int, engine_tp: int) -> None:
    sources, regions = trainer(ROWS, tp=trainer_tp, k=k)
    plain, _ = trainer(ROWS, tp=trainer_tp, k=1)
    for t in range(engine_tp):
        layout = EngineLayout(tp_rank=t, tp_size=engine_tp, scheme=Scheme.MEGATRON)
        # No hole read along and no enclosing block: every descriptor is the layout's own.
        plan = plan_refit(model=META, sources=sources, layout=layout, max_gap=0, max_overread=0)
        out = assemble(plan, stage(plan, regions))
        assert set(out) == set(ROWS)
        for name, (_, tensor) in ROWS.items():
            assert torch.equal(out[name], _columns(name, tensor, t, engine_tp)), name
        before = plan_refit(model=META, sources=plain, layout=layout, max_gap=0, max_overread=0).descriptors
        if engine_tp <= trainer_tp:  # whole shards: contiguous with or without blocks (and back to back)
            assert plan.descriptors == before <= len(ROWS) * (trainer_tp // engine_tp)
        elif trainer_tp * k % engine_tp == 0:  # the engine's columns are whole blocks: one read per tensor
            assert plan.descriptors == len(ROWS)
            assert all(r.count == 1 for r in plan.reads)
            assert before == len(ROWS) * H  # without blocks: one descriptor per row
        else:  # half a block each (TP1, k=4, engine TP8): still a strided slice, with blocks half as long
            assert plan.descriptors == before == len(ROWS) * H


@pytest.mark.parametrize(("trainer_tp", "engine_tp"), [(1, 1), (1, 4), (2, 8), (2, 1)])
def test_hf_engine_tensors_assemble_exactly_from_blocked_shards(trainer_tp: int, engine_tp: int) -> None:
    tensors = {**OTHERS, **ROWS}
    sources, regions = trainer(tensors, tp=trainer_tp, k=4)
    for t in range(engine_tp):
        plan = plan_refit(model=META, sources=sources, layout=EngineLayout(tp_rank=t, tp_size=engine_tp))
        out = assemble(plan, stage(plan, regions))
        want = {
            "model.layers.0.self_attn.o_proj.weight": L + "self_attention.linear_proj.weight",
            "model.layers.0.mlp.down_proj.weight": L + "mlp.linear_fc2.weight",
            **{f"model.layers.0.mlp.experts.{e}.down_proj.weight": f"{L}mlp.experts.linear_fc2.weight{e}"
               for e in range(E)},
        }  # fmt: skip
        for hf, name in want.items():
            assert torch.equal(out[hf], _columns(name, tensors[name][1], t, engine_tp)), hf
        assert torch.equal(out["model.layers.0.input_layernorm.weight"], OTHERS[L + "input_layernorm.weight"][1])
        gate = tensors[L + "mlp.linear_fc1.weight"][1][:F]
        rows = F // engine_tp
        assert torch.equal(out["model.layers.0.mlp.gate_proj.weight"], gate[t * rows : (t + 1) * rows])


# -- trainer memory: snapshot slots and the live mirror store the blocked layout -------------------------


def test_snapshot_slots_and_the_live_mirror_hold_the_blocks() -> None:
    row, norm = _rand(6, 8, seed=20), _rand(5, seed=21)
    layouts = [ColumnBlocks(dim=1, count=4), None]
    want_row = _blocked_bytes(row, 4)

    def stored(arena: torch.Tensor, offset: int, t: torch.Tensor) -> torch.Tensor:
        return memory.arena_view(arena, offset, t).contiguous().view(-1).view(torch.uint8)

    ring = memory.SnapshotRing([row, norm], slots=1, layouts=layouts)
    slot = ring.write(1, lambda version: None)
    arenas = [b.owner for b in ring.slot_blocks(slot)]
    assert torch.equal(stored(arenas[ring.block_index[0]], ring.offsets[0], row), want_row)
    assert torch.equal(memory.arena_view(arenas[ring.block_index[1]], ring.offsets[1], norm), norm)

    mirror = memory.BlockedMirror([row], layouts[:1])
    assert mirror.nbytes >= row.numel() * row.element_size()
    mirror.refresh()
    assert torch.equal(stored(mirror.blocks[0].owner, mirror.offsets[0], row), want_row)
    row.add_(1.0)  # an optimizer step: the mirror follows on the next refresh only
    assert torch.equal(stored(mirror.blocks[0].owner, mirror.offsets[0], row), want_row)
    mirror.refresh()
    assert torch.equal(stored(mirror.blocks[0].owner, mirror.offsets[0], row), _blocked_bytes(row, 4))


def test_a_block_that_is_a_whole_engine_tensor_can_be_read_straight_into_the_engine() -> None:
    """k = engine TP / trainer TP: each engine rank's slice is one block, a dense tensor of the engine's
    own shape, so a receiver may read it directly into the engine's memory (`plan_refit(direct=...)`)."""
    sources, regions = trainer(ROWS, tp=2, k=4)
    for t in range(8):
        layout = EngineLayout(tp_rank=t, tp_size=8, scheme=Scheme.MEGATRON)
        plan = plan_refit(model=META, sources=sources, layout=layout, direct=lambda target: True)
        assert {d.target for d in plan.direct} == set(ROWS) and not plan.pieces
        for d in plan.direct:
            tensor = ROWS[d.target][1]
            got = regions[d.rank][d.remote_offset : d.remote_offset + d.nbytes].view(torch.float32)
            assert torch.equal(got.view(H, -1), _columns(d.target, tensor, t, 8)), d.target
