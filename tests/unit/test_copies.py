"""A streamed chunk's copies prepared once (refit/copies.py) and direct reads cut into batches.

The kept copies must write the bytes the slot holds at each run (a refit re-stages new bytes into
the same slot), and be rebuilt when an engine tensor moves. Checked against the target cut from the
global tensor, on the CPU and, where there is one, on a GPU (a replayed CUDA graph).
"""

from __future__ import annotations

import pytest
import torch

from refit.copies import ChunkCopier
from refit.dtypes import torch_dtype
from refit.plan.planner import plan_refit
from refit.plan.records import DirectRead
from refit.plan.targets import EngineLayout
from refit.reads import batched
from refit.streaming import DIRECT_AT_ONCE_WINDOWS, direct_depth
from tests.unit.test_assemble import expected, global_tensors, meta, stage, trainer

VOCAB, PADDED = 61, 64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("trainer_tp", "engine_tp"), [(1, 1), (2, 1), (1, 2), (4, 2)])
def test_kept_copies_write_each_refits_bytes(device: str, trainer_tp: int, engine_tp: int) -> None:
    layout = EngineLayout(tp_rank=engine_tp - 1, tp_size=engine_tp, vocab_size=VOCAB)
    dests: dict[str, torch.Tensor] = {}
    copiers: dict[int, ChunkCopier] = {}
    stream = torch.cuda.Stream() if device == "cuda" else None
    for version in range(3):  # new weights each time, through the same slot and engine tensors
        tensors = global_tensors(PADDED, seed=version)
        sources, buffers = trainer(tensors, trainer_tp)
        plan = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=layout, window=1024)
        assert len(plan.chunks) > 2
        if not dests:
            dests = {t.hf_name: torch.full(t.shape, float("nan"), dtype=torch_dtype(t.dtype), device=device)
                     for t in plan.targets}  # fmt: skip
            slot = torch.empty(max(c.staging_bytes for c in plan.chunks), dtype=torch.uint8, device=device)
        for k, chunk in enumerate(plan.chunks):
            slot[: chunk.staging_bytes].copy_(stage(chunk, buffers))
            copier = copiers.get(k)
            if copier is None or not copier.valid(slot, dests):
                copier = copiers[k] = ChunkCopier(plan, k, slot, dests)
            copier.run(stream)
            if stream is not None:
                stream.synchronize()
        for t in plan.targets:
            published = sum(b - a for a, b in t.rows)
            got = dests[t.hf_name].cpu()
            want = expected(t, tensors[t.source][1])
            if t.dim is not None:
                got, want = got.narrow(t.dim, 0, published), want.narrow(t.dim, 0, published)
            assert torch.equal(got, want), (version, t.hf_name)
    assert any(o.dtype == torch.int64 for c in copiers.values() for o in c._outs)  # float32 pairs moved as words
    if device == "cuda":
        assert any(c._graph is not None for c in copiers.values())  # replayed, not launched one by one


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("overread", [0, 1 << 20])  # packed pieces, or read as their enclosing blocks
@pytest.mark.parametrize(("trainer_tp", "engine_tp"), [(1, 1), (2, 1), (1, 2), (4, 2), (2, 4)])
def test_chunks_copied_out_of_the_trainers_regions(device: str, overread: int, trainer_tp: int, engine_tp: int) -> None:
    # What a receiver on the trainers' GPU does with its mapped regions: no slot, each piece a view of
    # the trainer's own bytes at its remote offsets and strides (QKV rows of each group, a column half).
    layout = EngineLayout(tp_rank=engine_tp - 1, tp_size=engine_tp, vocab_size=VOCAB)
    dests: dict[str, torch.Tensor] = {}
    kept: dict[int, ChunkCopier] = {}
    for version in range(2):  # new bytes in the same regions: the kept copies read them
        tensors = global_tensors(PADDED, seed=version)
        sources, buffers = trainer(tensors, trainer_tp)
        if not kept:
            regions = {(rank, 0): buf.to(device) for rank, buf in buffers.items()}
        else:
            for rank, buf in buffers.items():
                regions[rank, 0].copy_(buf)
        window = 8192 if overread else 1024  # a smaller window cuts pieces too small to read enclosed
        model = meta(VOCAB, PADDED)
        plan = plan_refit(model=model, sources=sources, layout=layout, window=window, max_overread=overread)
        assert len(plan.chunks) > 2
        if engine_tp > trainer_tp:  # row-parallel column slices: strided in the trainer's region
            assert any(p.count > 1 and bool(p.local_stride) == bool(overread) for p in plan.pieces)
        if not dests:
            dests = {t.hf_name: torch.full(t.shape, float("nan"), dtype=torch_dtype(t.dtype), device=device)
                     for t in plan.targets}  # fmt: skip
        for k in range(len(plan.chunks)):
            copier = kept.get(k)
            if copier is None or not copier.valid(regions, dests):
                copier = kept[k] = ChunkCopier(plan, k, regions, dests)
            copier.run(torch.cuda.current_stream() if device == "cuda" else None)
        if device == "cuda":
            torch.cuda.synchronize()
        for t in plan.targets:
            published = sum(b - a for a, b in t.rows)
            got, want = dests[t.hf_name].cpu(), expected(t, tensors[t.source][1])
            if t.dim is not None:
                got, want = got.narrow(t.dim, 0, published), want.narrow(t.dim, 0, published)
            assert torch.equal(got, want), (version, t.hf_name)
    moved = {key: view.clone() for key, view in regions.items()}  # a peer mapped anew elsewhere
    assert all(c.valid(regions, dests) and not c.valid(moved, dests) for c in kept.values())


def test_a_moved_engine_tensor_invalidates_the_kept_copies() -> None:
    tensors = global_tensors(PADDED)
    sources, buffers = trainer(tensors, 2)
    plan = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=EngineLayout(vocab_size=VOCAB), window=1024)
    dests = {t.hf_name: torch.zeros(t.shape, dtype=torch_dtype(t.dtype)) for t in plan.targets}
    slot = stage(plan.chunks[0], buffers).clone()
    copier = ChunkCopier(plan, 0, slot, dests)
    assert copier.valid(slot, dests)
    name = next(t.hf_name for t in plan.targets if t.source == plan.chunks[0].pieces[0].tensor)
    moved = dict(dests, **{name: dests[name].clone()})
    assert not copier.valid(slot, moved)
    assert not copier.valid(slot.clone(), dests)
    assert not copier.valid(slot, {k: v for k, v in dests.items() if k != name})


def _read(nbytes: int, rank: int = 0, at: int = 0) -> DirectRead:
    return DirectRead(target="t", rank=rank, region=0, remote_offset=at, offset=0, nbytes=nbytes)


def test_direct_reads_are_cut_into_batches_of_about_a_chunk_in_order() -> None:
    reads = [_read(n) for n in (300, 300, 500, 100, 100, 900, 10)]
    batches = batched(reads, 600)
    assert [r for b in batches for r in b] == reads  # every read once, in order
    assert [[r.nbytes for r in b] for b in batches] == [[300, 300], [500, 100], [100], [900], [10]]
    assert batched(reads, 0) == [reads]  # no chunks: one batch


def test_every_batch_of_direct_reads_takes_from_every_rank_in_proportion() -> None:
    # Rank 0 serves a quarter of the bytes, rank 1 three quarters: each batch of ~400 takes ~100 and ~300.
    reads = [_read(50, 0, 50 * i) for i in range(8)] + [_read(100, 1, 100 * i) for i in range(12)]
    batches = batched(reads, 400)
    assert sorted((r for b in batches for r in b), key=reads.index) == reads  # every read once
    assert len(batches) == 4
    for b in batches:
        assert [r.nbytes for r in b] == [50, 50, 100, 100, 100]
    for rank in (0, 1):  # each rank's reads keep their order
        mine = [r for b in batches for r in b if r.rank == rank]
        assert mine == [r for r in reads if r.rank == rank]


def test_direct_batches_all_in_flight_only_with_few_chunks() -> None:
    # With few chunks every batch is posted at once (a peer serves in order: the chunks follow the
    # batches); with many, two at a time so that chunk pulls keep pace with their installs.
    for slots in (2, 3):
        assert direct_depth(0, 9, slots) == 9
        assert direct_depth(DIRECT_AT_ONCE_WINDOWS * slots, 9, slots) == 9  # the staged bytes fill two windows
        assert direct_depth(DIRECT_AT_ONCE_WINDOWS * slots + 1, 9, slots) == 2
        assert direct_depth(13, 20, slots) == 2
        assert direct_depth(0, 0, slots) == 1


class _Peers:
    """What `StagingPool.mapped_regions` asks of `LocalPeers` (which maps only on a GPU): whether a rank
    is mapped, and its regions as tensors (None for a rank whose memory is on another GPU)."""

    def __init__(self, views: dict[str, dict[int, torch.Tensor] | None]) -> None:
        self.enabled, self._views = True, views

    def add(self, source) -> bool:
        return source.agent_name in self._views

    def views(self, name: str) -> dict[int, torch.Tensor] | None:
        return self._views[name]

    def close(self) -> None:
        pass


def test_chunks_are_copied_out_only_where_every_rank_they_take_from_is_mapped_here() -> None:
    from refit.staging import StagingPool
    from refit.transport.nixl import NixlAgent

    sources, buffers = trainer(global_tensors(PADDED), 2)
    plan = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=EngineLayout(vocab_size=VOCAB), window=1024)
    assert {p.rank for p in plan.pieces} == {0, 1}
    pool = StagingPool(NixlAgent(prefix="test-mapped"), "t")
    try:
        assert pool.mapped_regions(plan, sources) is None  # no peers mapped over CUDA IPC (a CPU engine)
        both = {s.agent_name: {0: buffers[s.rank]} for s in sources}
        pool.agent.local = _Peers(both)
        regions = pool.mapped_regions(plan, sources)
        assert regions is not None and set(regions) == {(0, 0), (1, 0)} and regions[1, 0] is buffers[1]
        pool.agent.local = _Peers({**both, "a1": None})  # rank 1 on another GPU: every chunk is staged
        assert pool.mapped_regions(plan, sources) is None
        pool.agent.local = _Peers({"a0": both["a0"]})  # rank 1 not mapped at all
        assert pool.mapped_regions(plan, sources) is None
        pool.agent.local.enabled = False
        assert pool.mapped_regions(plan, sources) is None
    finally:
        pool.close()
