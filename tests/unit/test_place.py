"""The planner's pure helpers: interval merging, the stripe rule, and how pieces are laid out in staging
and grouped into reads (holes read along up to `max_gap` or as the link's cost says, alignment, strided
reads kept apart). The cost decisions themselves are in test_planner_cost.py.

Layout cases use replicated tensors placed at chosen byte offsets of one trainer region, planned in
the megatron scheme (any name, whole tensors), so every offset below is computed by hand.
"""

from __future__ import annotations

import pytest

from refit.dtypes import DTYPE_SIZES
from refit.plan.cost import DEFAULT_COST
from refit.plan.planner import Plan, plan_refit, stripe
from refit.plan.targets import EngineLayout, merge_intervals
from refit.types import ModelMeta, ParallelCoords, Region, Role, SourceRecord, TensorDesc

META = ModelMeta(
    architecture="llama", num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=2, kv_channels=4,
    ffn_hidden_size=16, padded_vocab_size=64,
)  # fmt: skip
MEGATRON = EngineLayout(scheme="megatron")


def source(rank: int, *tensors: tuple[str, Role, str, tuple[int, ...], int]) -> SourceRecord:
    """A trainer rank holding whole tensors `(name, role, dtype, shape, byte offset)` in region 0."""
    descs = tuple(
        TensorDesc.shard(name=n, role=role, dtype=dt, global_shape=shape, byte_offset=at)
        for n, role, dt, shape, at in tensors
    )
    end = max(d.byte_offset + d.nbytes for d in descs)
    return SourceRecord(
        rank=rank, coords=ParallelCoords(), agent_name=f"a{rank}", agent_metadata=b"",
        regions=(Region(index=0, addr=4096, nbytes=end),), tensors=descs,
    )  # fmt: skip


def whole(name: str, dtype: str, nbytes: int, at: int) -> tuple[str, Role, str, tuple[int, ...], int]:
    return name, Role.REPLICATED, dtype, (nbytes // DTYPE_SIZES[dtype],), at


def layout_of(plan: Plan) -> dict[str, int]:
    """Staging offset of every piece by tensor name, after checking the reads carry exactly the pieces."""
    for p in plan.pieces:
        assert p.local_offset % DTYPE_SIZES[p.dtype] == 0, p.tensor
        (read,) = [r for r in plan.reads if r.local_offset <= p.local_offset < r.local_offset + r.nbytes]
        assert p.local_offset + p.staged_bytes <= read.local_offset + read.nbytes
        assert read.rank == p.rank and p.remote_offset - read.remote_offset == p.local_offset - read.local_offset
    return {p.tensor: p.local_offset for p in plan.pieces}


# -- merge_intervals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("intervals", "merged"),
    [
        ([], []),
        ([(5, 9), (0, 3)], [(0, 3), (5, 9)]),  # sorted
        ([(0, 4), (4, 8)], [(0, 8)]),  # touching intervals join
        ([(0, 6), (2, 4)], [(0, 6)]),  # contained
        ([(0, 5), (3, 9), (12, 14)], [(0, 9), (12, 14)]),  # overlapping
        ([(3, 3), (7, 2), (1, 2)], [(1, 2)]),  # empty and reversed ones dropped
    ],
)
def test_merge_intervals(intervals: list[tuple[int, int]], merged: list[tuple[int, int]]) -> None:
    assert merge_intervals(intervals) == merged


# -- stripe ------------------------------------------------------------------------------------------


def test_every_engine_rank_of_a_fleet_gets_its_own_stripe() -> None:
    stripes = [stripe(replica=r, tp_rank=t, tp_size=4) for r in range(3) for t in range(4)]
    assert stripes == list(range(12))  # replicas, then TP ranks within each


# -- _place ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hole", "max_gap", "reads"), [(64, 64, 1), (65, 64, 2), (0, 0, 1), (1, 0, 2)])
def test_a_hole_up_to_max_gap_is_read_along_and_one_byte_more_splits_the_read(
    hole: int, max_gap: int, reads: int
) -> None:
    src = source(0, whole("a", "uint8", 16, 0), whole("b", "uint8", 16, 16 + hole))
    plan = plan_refit(model=META, sources=[src], layout=MEGATRON, max_gap=max_gap)
    assert len(plan.reads) == reads
    if reads == 1:  # the hole is mirrored in staging and moved, but not counted as needed bytes
        assert layout_of(plan) == {"a": 0, "b": 16 + hole}
        assert (plan.wire_bytes, plan.total_bytes, plan.staging_bytes) == (32 + hole, 32, 32 + hole)
    else:  # packed back to back
        assert layout_of(plan) == {"a": 0, "b": 16}
        assert (plan.wire_bytes, plan.staging_bytes) == (32, 32)


def test_without_max_gap_the_default_link_decides_which_holes_are_read_along() -> None:
    # One InfiniBand rail: 12.2 GB/s and 0.54 us a descriptor, i.e. 6,588 bytes move in one descriptor's time.
    assert DEFAULT_COST.break_even_bytes == pytest.approx(6588)
    near = source(0, whole("a", "uint8", 16, 0), whole("b", "uint8", 16, 16 + 6500))
    far = source(0, whole("a", "uint8", 16, 0), whole("b", "uint8", 16, 16 + 6700))
    assert len(plan_refit(model=META, sources=[near], layout=MEGATRON).reads) == 1
    assert len(plan_refit(model=META, sources=[far], layout=MEGATRON).reads) == 2


def test_a_piece_after_an_odd_sized_one_starts_aligned() -> None:
    # Remote: 3 bytes of uint8, then float32 right at byte 3. Joining the read would put the floats at
    # staging offset 3, so they start a new read at offset 4.
    odd = whole("a", "uint8", 3, 0)
    plan = plan_refit(model=META, sources=[source(0, odd, whole("b", "float32", 16, 3))], layout=MEGATRON)
    assert layout_of(plan) == {"a": 0, "b": 4} and len(plan.reads) == 2 and plan.staging_bytes == 20
    # Remote float32 at byte 4: the one-byte hole keeps it aligned, so it is read along.
    plan = plan_refit(model=META, sources=[source(0, odd, whole("b", "float32", 16, 4))], layout=MEGATRON)
    assert layout_of(plan) == {"a": 0, "b": 4} and len(plan.reads) == 1 and plan.wire_bytes == 20


def test_pieces_of_different_sources_are_never_joined_but_stay_aligned() -> None:
    srcs = [source(0, whole("a", "uint8", 3, 0)), source(1, whole("b", "float64", 16, 3))]
    plan = plan_refit(model=META, sources=srcs, layout=MEGATRON)
    assert layout_of(plan) == {"a": 0, "b": 8} and len(plan.reads) == 2
    assert sorted((r.rank, r.remote_offset, r.local_offset, r.nbytes) for r in plan.reads) == [
        (0, 0, 0, 3),
        (1, 3, 8, 16),
    ]


def test_strided_reads_are_never_merged() -> None:
    # A row-parallel weight the engine (TP 2) takes columns 4..8 of: 8 strided blocks of 4 floats,
    # between contiguous tensors that touch it on both sides in the trainer's region. No staging
    # budget for enclosing blocks, so the slices are read strided.
    row = ("w", Role.ROW, "float32", (8, 8), 16)
    src = source(0, whole("a", "float32", 16, 0), row, whole("b", "float32", 16, 16 + 256), ("w2", *row[1:4], 288))
    layout = EngineLayout(scheme="megatron", tp_rank=1, tp_size=2)
    plan = plan_refit(model=META, sources=[src], layout=layout, max_overread=0)
    strided = sorted((r for r in plan.reads if r.count > 1), key=lambda r: r.remote_offset)
    assert [(r.remote_offset, r.block_bytes, r.count, r.remote_stride) for r in strided] == [
        (16 + 16, 16, 8, 32),
        (288 + 16, 16, 8, 32),
    ]
    contiguous = sorted((r.remote_offset, r.nbytes) for r in plan.reads if r.count == 1)
    assert contiguous == [(0, 16), (272, 16)]  # a and b, each a read of its own
    offsets = layout_of(plan)
    assert offsets == {"a": 0, "w": 16, "b": 16 + 128, "w2": 16 + 128 + 16}
    assert plan.staging_bytes == plan.wire_bytes == 2 * 16 + 2 * 128
    # A strided read is one descriptor per block; w's last block and b touch in the trainer's region
    # and in staging, so the transport merges them, and so does the count.
    assert plan.descriptors == 2 + 2 * 8 - 1
