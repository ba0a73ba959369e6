"""The descriptor cost model and the planner's cost-based choices, on hand-computed cases.

Which holes are read along, which strided slices are read as their enclosing block, how many
descriptors the transport posts, and that the assembled tensors stay bit-exact either way. Trainer
ranks are synthetic byte buffers; the plan's reads are carried out by copying bytes, as the
transport would.
"""

from __future__ import annotations

import math

import pytest
import torch

from refit.dtypes import DTYPE_SIZES
from refit.errors import ConfigError
from refit.plan.assemble import assemble, piece_view
from refit.plan.cost import CPU_UCX, GPU_LOCAL, IB_RAIL, NVLINK, LinkCost, enclose, price
from refit.plan.planner import Piece, Plan, Read, plan_refit
from refit.plan.records import count_descriptors
from refit.plan.targets import EngineLayout, Target
from refit.transport.jobs import jobs_for, merge_reads
from refit.types import ModelMeta, ParallelCoords, Region, Role, SourceRecord, TensorDesc

GiB = 1 << 30
H, NH, NG, D, F, VP, E, FE = 16, 8, 4, 4, 32, 64, 4, 8  # hidden, heads, groups, head dim, ffn, vocab, experts, ...
META = ModelMeta(
    architecture="deepseek_v3", num_layers=1, hidden_size=H, num_attention_heads=NH, num_query_groups=NG,
    kv_channels=D, ffn_hidden_size=F, padded_vocab_size=VP, vocab_size=VP, num_experts=E, moe_ffn_hidden_size=FE,
    params_dtype="float32",
)  # fmt: skip
L = "decoder.layers.0."
MOE = [
    ("embedding.word_embeddings.weight", Role.VOCAB_PARALLEL, (VP, H)),
    (L + "self_attention.linear_qkv.weight", Role.QKV_COLUMN, ((NH + 2 * NG) * D, H)),
    (L + "self_attention.linear_proj.weight", Role.ROW, (H, NH * D)),
    (L + "pre_mlp_layernorm.weight", Role.REPLICATED, (H,)),
    (L + "mlp.router.weight", Role.REPLICATED, (E, H)),
    *[
        spec
        for e in range(E)
        for spec in (
            (f"{L}mlp.experts.linear_fc1.weight{e}", Role.EXPERT_GATED_COLUMN, (2 * FE, H)),
            (f"{L}mlp.experts.linear_fc2.weight{e}", Role.EXPERT_ROW, (H, FE)),
        )
    ],
]
EXPERTS_BYTES = E * (2 * FE * H + H * FE) * 4  # float32


def megatron(**kw: int) -> EngineLayout:
    return EngineLayout(scheme="megatron", **kw)


def trainer(
    specs: list[tuple[str, Role, tuple[int, ...]]], *, seed: int = 0
) -> tuple[SourceRecord, torch.Tensor, dict[str, torch.Tensor]]:
    """One trainer rank holding every tensor whole (TP 1, EP 1), packed back to back."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=gen) for name, _, shape in specs}
    descs, offset = [], 0
    for name, role, shape in specs:
        desc = TensorDesc.shard(name=name, role=role, dtype="float32", global_shape=shape, byte_offset=offset)
        descs.append(desc)
        offset += descs[-1].nbytes
    end = max(d.byte_offset + d.nbytes for d in descs)
    buffer = torch.zeros(end, dtype=torch.uint8)
    for d in descs:
        buffer[d.byte_offset : d.byte_offset + d.nbytes] = tensors[d.name].view(-1).view(torch.uint8)
    src = SourceRecord(
        rank=0, coords=ParallelCoords(), agent_name="a0", agent_metadata=b"",
        regions=(Region(index=0, addr=4096, nbytes=end),), tensors=tuple(descs),
    )  # fmt: skip
    return src, buffer, tensors


def stage(plan: Plan, buffer: torch.Tensor) -> torch.Tensor:
    """Carry out the reads: block i of a read comes from remote_offset + i * remote_stride, packed in staging."""
    staging = torch.full((plan.staging_bytes,), 0xFF, dtype=torch.uint8)
    for r in plan.reads:
        for i in range(r.count):
            src, dst = r.remote_offset + i * r.remote_stride, r.local_offset + i * r.block_bytes
            staging[dst : dst + r.block_bytes] = buffer[src : src + r.block_bytes]
    return staging


def expected(target: Target, tensor: torch.Tensor) -> torch.Tensor:
    if target.dim is None:
        return tensor
    return torch.cat([tensor.narrow(target.dim, a, b - a) for a, b in target.rows], dim=target.dim)


def check_exact(plan: Plan, buffer: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    out = assemble(plan, stage(plan, buffer))
    for t in plan.targets:
        assert torch.equal(out[t.hf_name], expected(t, tensors[t.source])), t.hf_name


def posted(plan: Plan, src: SourceRecord) -> int:
    """Descriptors the transport would post: its own merging of the expanded reads."""
    return sum(len(merge_reads(job.ops)) for job in jobs_for(plan, [src], 0, "cpu", 0))


# -- the model ---------------------------------------------------------------------------------------------


def test_seconds_are_bytes_over_bandwidth_plus_descriptors() -> None:
    link = LinkCost(bandwidth_Bps=1e9, descriptor_s=1e-6)
    assert link.seconds(nbytes=2_000_000, descriptors=3) == pytest.approx(2e-3 + 3e-6)
    assert link.break_even_bytes == pytest.approx(1000)
    assert link.bridges(0) and link.bridges(999) and not link.bridges(1000)
    assert LinkCost(bandwidth_Bps=1e9, descriptor_s=0).bridges(0)  # touching pieces always join
    with pytest.raises(ConfigError):
        LinkCost(bandwidth_Bps=0, descriptor_s=1e-6)
    with pytest.raises(ConfigError):
        LinkCost(bandwidth_Bps=1e9, descriptor_s=-1)


def test_presets_reproduce_the_figures_they_were_fitted_to() -> None:
    # One H100: 8 GiB at 1,141 GB/s in one descriptor, 151 GB/s in 4,000.
    for n, gbps in ((1, 1141), (4000, 151)):
        assert 8 * GiB / GPU_LOCAL.seconds(nbytes=8 * GiB, descriptors=n) / 1e9 == pytest.approx(gbps, rel=0.01)
    # One IB rail: 4 KiB descriptors at 4.69 GB/s.
    assert 4096 / IB_RAIL.seconds(nbytes=4096, descriptors=1) / 1e9 == pytest.approx(4.69, rel=0.01)
    # CPU over UCX: 64 MiB in 16,384 descriptors at 3.45 GB/s.
    assert 64 * 2**20 / CPU_UCX.seconds(nbytes=64 * 2**20, descriptors=16384) / 1e9 == pytest.approx(3.45, rel=0.02)
    assert NVLINK.descriptor_s == GPU_LOCAL.descriptor_s


def test_enclose_takes_the_best_saving_per_unneeded_byte_within_the_budget() -> None:
    link = LinkCost(bandwidth_Bps=1e9, descriptor_s=1e-6)
    # (key, block bytes, count, stride): spans 9,100 / 4,600 / 190 bytes for 1,000 / 1,000 / 100 needed.
    strided = [("wide", 100, 10, 1000), ("narrow", 200, 5, 1100), ("tiny", 10, 10, 20)]
    # Savings: wide 9e-6 - 8.1e-6 = 0.9 us for 8,100 extra bytes; narrow 4e-6 - 3.6e-6 = 0.4 us for
    # 3,600; tiny 9e-6 - 0.09e-6 for 90. Per extra byte: tiny, then narrow, then wide.
    assert enclose(strided, cost=link, budget=math.inf) == {"wide", "narrow", "tiny"}
    assert enclose(strided, cost=link, budget=3690) == {"narrow", "tiny"}
    assert enclose(strided, cost=link, budget=8100) == {"tiny", "narrow"}  # wide no longer fits
    assert enclose(strided, cost=link, budget=89) == set()
    # Descriptors that cost nothing: reading the bytes between blocks never pays.
    assert enclose(strided, cost=LinkCost(bandwidth_Bps=1e9, descriptor_s=0), budget=math.inf) == set()


def test_alike_slices_a_budget_cannot_all_cover_are_picked_by_seed() -> None:
    # 64 equal slices (every expert of a layer is alike), budget for 8: each seed picks its own 8, so
    # engine ranks spread the unneeded bytes over the trainer ranks that hold those experts.
    link = LinkCost(bandwidth_Bps=1e9, descriptor_s=1e-6)
    strided = [(e, 100, 10, 200) for e in range(64)]  # 900 unneeded bytes each
    picks = [enclose(strided, cost=link, budget=8 * 900, seed=s) for s in range(16)]
    assert all(len(p) == 8 for p in picks)
    assert picks[3] == enclose(strided, cost=link, budget=8 * 900, seed=3)  # deterministic
    assert len(set.union(*picks)) > 32


def test_descriptor_count_is_what_the_transport_posts() -> None:
    reads = [
        Read(rank=0, region=0, remote_offset=0, local_offset=0, block_bytes=16),
        Read(rank=0, region=0, remote_offset=32, local_offset=16, block_bytes=16, count=8, remote_stride=32),
        Read(rank=0, region=0, remote_offset=272, local_offset=144, block_bytes=16),  # touches the last block
        Read(rank=0, region=0, remote_offset=400, local_offset=160, block_bytes=8, count=4, remote_stride=8),
        Read(rank=1, region=0, remote_offset=0, local_offset=192, block_bytes=0),  # nothing to move
    ]
    assert [r.descriptors for r in reads] == [1, 8, 1, 1, 0]
    assert count_descriptors(reads) == 1 + 8 + 1 + 1 - 1
    plan = Plan(targets=(), pieces=(), reads=tuple(reads), staging_bytes=192, bytes_by_rank={})
    src = SourceRecord(rank=0, coords=ParallelCoords(), agent_name="a0", agent_metadata=b"",
                       regions=(Region(index=0, addr=0, nbytes=1024),), tensors=())  # fmt: skip
    jobs = jobs_for(Plan(targets=(), pieces=(), reads=tuple(reads[:4]), staging_bytes=192, bytes_by_rank={}),
                    [src], 0, "cpu", 0)  # fmt: skip
    assert plan.descriptors == sum(len(merge_reads(j.ops)) for j in jobs) == 10
    assert price(plan, IB_RAIL) == pytest.approx(IB_RAIL.seconds(nbytes=16 + 128 + 16 + 32, descriptors=10))


# -- holes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("descriptor_s", "reads"), [(4e-6, 1), (2e-6, 2)])
def test_the_hole_of_experts_another_rank_owns_is_read_along_when_cheaper_than_a_descriptor(
    descriptor_s: float, reads: int
) -> None:
    # Engine EP 2, rank 1, TP 1: every dense tensor whole, then experts 2 and 3. Experts 0 and 1 lie
    # between them in the trainer's region: 3,072 bytes, 3.072 us at 1 GB/s, against a descriptor of
    # 4 us (read along: one read) or 2 us (skipped: two reads).
    src, buffer, tensors = trainer(MOE)
    link = LinkCost(bandwidth_Bps=1e9, descriptor_s=descriptor_s)
    plan = plan_refit(model=META, sources=[src], layout=megatron(ep_rank=1, ep_size=2), cost=link)
    hole = EXPERTS_BYTES // 2
    assert hole == 3072 and len(plan.reads) == plan.descriptors == reads
    assert plan.total_bytes == buffer.numel() - hole
    assert plan.wire_bytes == plan.total_bytes + (hole if reads == 1 else 0)
    assert plan.modelled_s == pytest.approx(plan.wire_bytes / 1e9 + reads * descriptor_s)
    check_exact(plan, buffer, tensors)


def test_adjacent_experts_are_one_read() -> None:
    # Engine EP 2, rank 0: dense tensors and experts 0 and 1 sit back to back: one descriptor in all.
    src, buffer, tensors = trainer(MOE)
    plan = plan_refit(model=META, sources=[src], layout=megatron(ep_rank=0, ep_size=2))
    assert plan.descriptors == 1 and plan.wire_bytes == plan.total_bytes == buffer.numel() - EXPERTS_BYTES // 2
    check_exact(plan, buffer, tensors)


# -- enclosing blocks ---------------------------------------------------------------------------------------

# A row-parallel weight w [8, 8] float32 between two small tensors; an engine at TP 2, rank 1, needs
# its columns 4..8: 8 blocks of 16 bytes, 32 apart, from byte 32 to 272 (240 bytes, 128 needed).
ROW_CASE = [("a", Role.REPLICATED, (4,)), ("w", Role.ROW, (8, 8)), ("b", Role.REPLICATED, (4,))]
TP2_RANK1 = megatron(tp_rank=1, tp_size=2)


def test_a_strided_slice_is_read_as_its_enclosing_block_when_that_is_cheaper() -> None:
    src, buffer, tensors = trainer(ROW_CASE)
    link = LinkCost(bandwidth_Bps=1e9, descriptor_s=1e-6)
    # Strided: 8 descriptors and 128 bytes (8.128 us); enclosed: 1 descriptor and 240 bytes (1.24 us).
    # The enclosing block then touches b, and the 16-byte hole after a is read along: one read.
    plan = plan_refit(model=META, sources=[src], layout=TP2_RANK1, cost=link, max_overread=math.inf)
    w = next(p for p in plan.pieces if p.tensor == "w")
    assert (w.remote_offset, w.block_bytes, w.count, w.remote_stride, w.local_stride) == (32, 16, 8, 32, 32)
    assert (w.nbytes, w.staged_bytes, w.local_offset) == (128, 240, 32)
    assert [(r.remote_offset, r.local_offset, r.block_bytes, r.count) for r in plan.reads] == [(0, 0, 288, 1)]
    assert (plan.descriptors, plan.wire_bytes, plan.total_bytes, plan.staging_bytes) == (1, 288, 160, 288)
    assert plan.modelled_s == pytest.approx(288e-9 + 1e-6)
    assert posted(plan, src) == 1
    check_exact(plan, buffer, tensors)
    view = piece_view(w, stage(plan, buffer))
    assert not view.is_contiguous() and torch.equal(view, tensors["w"][:, 4:])


@pytest.mark.parametrize(
    ("link", "max_overread"),
    [
        (LinkCost(bandwidth_Bps=1e9, descriptor_s=0), math.inf),  # free descriptors: the bytes decide
        (LinkCost(bandwidth_Bps=1e9, descriptor_s=1e-6), 0.0),  # no staging budget
        (LinkCost(bandwidth_Bps=1e9, descriptor_s=1e-6), 0.6),  # 96 bytes of budget < the 112 unneeded
    ],
    ids=["free-descriptors", "no-budget", "budget-too-small"],
)
def test_the_slice_stays_strided_when_enclosing_costs_more_or_does_not_fit(link: LinkCost, max_overread: float) -> None:
    src, buffer, tensors = trainer(ROW_CASE)
    plan = plan_refit(model=META, sources=[src], layout=TP2_RANK1, cost=link, max_overread=max_overread)
    w = next(p for p in plan.pieces if p.tensor == "w")
    assert (w.local_stride, w.staged_bytes, w.local_offset) == (0, 128, 16)
    # a, w's 8 blocks, b; w's last block touches b on both sides, so they merge.
    assert plan.descriptors == posted(plan, src) == 1 + 8 + 1 - 1
    assert (plan.wire_bytes, plan.staging_bytes) == (160, 160)
    assert plan.modelled_s == pytest.approx(160e-9 + 9 * link.descriptor_s)
    check_exact(plan, buffer, tensors)


def test_expert_fc2_slices_are_enclosed_where_attention_slices_are_not() -> None:
    # Engine TP 2 (experts split like dense layers): every fc2 [16, 8] gives 16 blocks of 16 bytes,
    # 32 apart (span 496, 256 needed); linear_proj [16, 32] gives 16 blocks of 64 bytes, 128 apart
    # (span 1,984, 1,024 needed). Enclosing saves 15 descriptors for 240 or 960 unneeded bytes: at
    # 1 GB/s it pays when a descriptor costs over 16 ns or over 64 ns. At 32 ns only fc2 is enclosed.
    src, buffer, tensors = trainer(MOE)
    link = LinkCost(bandwidth_Bps=1e9, descriptor_s=32e-9)
    for rank in (0, 1):
        plan = plan_refit(model=META, sources=[src], layout=megatron(tp_rank=rank, tp_size=2), cost=link,
                          max_overread=math.inf)  # fmt: skip
        enclosed = {p.tensor for p in plan.pieces if p.local_stride}
        assert enclosed == {f"{L}mlp.experts.linear_fc2.weight{e}" for e in range(E)}
        proj = next(p for p in plan.pieces if p.tensor.endswith("linear_proj.weight"))
        assert (proj.count, proj.block_bytes, proj.remote_stride, proj.local_stride) == (16, 64, 128, 0)
        assert plan.descriptors == posted(plan, src)
        check_exact(plan, buffer, tensors)


def test_an_enclosed_piece_with_several_outer_dims_is_a_strided_view_of_its_block() -> None:
    # Local shape (2, 3, 4) float32 split on dim 2; the piece is columns 2..4: 6 blocks of 8 bytes,
    # 16 apart, read from the first block's start to the last block's end.
    tensor = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    raw = tensor.view(-1).view(torch.uint8)
    piece = Piece(
        tensor="t", rank=0, dim=2, start=2, stop=4, shape=(2, 3, 2), dtype="float32", region=0, remote_offset=8,
        block_bytes=8, count=6, remote_stride=16, local_offset=8, local_stride=16,
    )  # fmt: skip
    assert piece.staged_bytes == 5 * 16 + 8
    staging = torch.zeros(8 + piece.staged_bytes, dtype=torch.uint8)
    staging[8:] = raw[8 : 8 + piece.staged_bytes]
    assert torch.equal(piece_view(piece, staging), tensor[:, :, 2:])


@pytest.mark.parametrize("descriptor_s", [0.0, 32e-9, 1e-6])
@pytest.mark.parametrize("max_overread", [0.0, 0.25, math.inf])
@pytest.mark.parametrize("layout", [megatron(tp_rank=1, tp_size=2), megatron(tp_rank=3, tp_size=4),
                                    megatron(tp_rank=1, tp_size=2, ep_rank=1, ep_size=2)], ids=str)  # fmt: skip
def test_every_plan_counts_the_descriptors_the_transport_posts_and_stays_exact(
    layout: EngineLayout, max_overread: float, descriptor_s: float
) -> None:
    src, buffer, tensors = trainer(MOE, seed=5)
    link = LinkCost(bandwidth_Bps=1e9, descriptor_s=descriptor_s)
    plan = plan_refit(model=META, sources=[src], layout=layout, cost=link, max_overread=max_overread)
    assert plan.descriptors == posted(plan, src)
    unneeded = sum(p.staged_bytes - p.nbytes for p in plan.pieces)
    assert unneeded <= max_overread * plan.total_bytes
    assert plan.wire_bytes >= plan.total_bytes + unneeded
    assert plan.modelled_s == pytest.approx(price(plan, link))
    check_exact(plan, buffer, tensors)
    for p in plan.pieces:  # every piece lies inside one read, mirrored from the trainer's region
        (read,) = [r for r in plan.reads if r.local_offset <= p.local_offset < r.local_offset + r.nbytes]
        assert p.local_offset + p.staged_bytes <= read.local_offset + read.nbytes
        if p.count == 1 or p.local_stride:
            assert p.remote_offset - read.remote_offset == p.local_offset - read.local_offset
        assert p.local_offset % DTYPE_SIZES[p.dtype] == 0
