"""`BlockBatch` (refit/plan/digest_batch.py): a chunk's digests in a few batched ops equal the per-run
digests of `refit.digest.block_digests` bit for bit, over every layout a staging slot holds: row blocks,
column blocks (packed or enclosed rows), odd line widths, one-word blocks, every word size, runs at odd
offsets of a slot at an odd address. The batched code is the GPU's; here it runs on CPU tensors."""

from __future__ import annotations

import random

import pytest
import torch

from refit import digest
from refit.plan import digest_batch
from refit.plan.digest_batch import MIN_CELL, BlockBatch, Span


def _geo(*, outer: int, block_bytes: int, blocks: int, word: int) -> digest.Geometry:
    # A unit of `word` bytes: any block width in words, as `digest.geometry` would give for such a shard.
    return digest.Geometry(columns=outer > 1, outer=outer, units=blocks * block_bytes // word, unit_bytes=word,
                           block_units=block_bytes // word, word=word)  # fmt: skip


def _per_run(buf: torch.Tensor, spans: list[Span], order: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([digest.block_digests(buf, spans[i].at, spans[i].geo, spans[i].count, spans[i].row_stride)
                      for i in order])  # fmt: skip


def _check(buf: torch.Tensor, spans: list[Span]) -> BlockBatch:
    batch = BlockBatch(spans, [None] * len(spans), buf.device, {None: buf.data_ptr() % 8})
    assert sorted(batch.order) == list(range(len(spans)))
    got = torch.cat(batch.run({None: buf}))
    assert torch.equal(got, _per_run(buf, spans, batch.order))
    return batch


def _buffer(nbytes: int, shift: int = 0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    whole = torch.randint(0, 256, (nbytes + 8,), dtype=torch.uint8, generator=gen)
    return whole[shift : shift + nbytes]


def test_row_blocks_of_every_line_width_and_offset() -> None:
    buf = _buffer(4 << 20)
    spans = [
        Span(_geo(outer=1, block_bytes=64 << 10, blocks=4, word=8), 0, 4, 0),  # lines of 16 KiB
        Span(_geo(outer=1, block_bytes=6 << 10, blocks=8, word=8), 256 << 10, 5, 0),  # lines of 256 words
        Span(_geo(outer=1, block_bytes=6 << 10, blocks=8, word=8), (320 << 10) + 512, 3, 0),  # cells of 512 B
        Span(_geo(outer=1, block_bytes=8 << 10, blocks=2, word=8), (400 << 10) + 64, 2, 0),  # cells of MIN_CELL
        Span(_geo(outer=1, block_bytes=24, blocks=4, word=8), 500 << 10, 4, 0),  # 3-word lines: one-word cells
        Span(_geo(outer=1, block_bytes=8, blocks=16, word=8), 600 << 10, 16, 0),  # one-word blocks
        Span(_geo(outer=1, block_bytes=4096, blocks=3, word=8), (700 << 10) + 8, 1, 0),  # an odd offset
        Span(_geo(outer=1, block_bytes=64 << 10, blocks=4, word=8), 64 << 10, 2, 0),  # overlapping runs
        Span(_geo(outer=1, block_bytes=64 << 10, blocks=16, word=8), (2 << 20) + 8, 16, 0),  # too many small cells
    ]
    batch = _check(buf, spans)
    assert batch.order[-1] == 8 and batch.per_run == 1  # the one run left to the per-run path


@pytest.mark.parametrize("word", [8, 4, 2, 1])
def test_column_blocks_packed_and_enclosed_of_every_word_size(word: int) -> None:
    buf = _buffer(2 << 20, seed=word)
    spans = [
        Span(_geo(outer=32, block_bytes=512, blocks=4, word=word), 0, 4, 2048),  # packed: rows 4 blocks apart
        Span(_geo(outer=32, block_bytes=512, blocks=8, word=word), 64 << 10, 2, 4096),  # enclosed in wider rows
        Span(_geo(outer=16, block_bytes=256, blocks=4, word=word), (128 << 10) + 256, 3, 1024),
        Span(_geo(outer=8, block_bytes=48 << 10, blocks=2, word=word), 256 << 10, 2, 96 << 10),  # several lines a row
        Span(_geo(outer=8, block_bytes=6, blocks=2, word=2 if word > 2 else word), 1 << 20, 2, 12),  # tiny: per run
        Span(_geo(outer=4, block_bytes=512, blocks=2, word=word), (1 << 20) + 4096, 2, 1024 + 64),  # odd stride
    ]
    _check(buf, spans)


@pytest.mark.parametrize("shift", [0, 1, 2, 4])
def test_a_slot_at_an_odd_address_batches_what_its_alignment_allows(shift: int) -> None:
    buf = _buffer(1 << 20, shift=shift, seed=shift)
    spans = [Span(_geo(outer=1, block_bytes=4096, blocks=4, word=w), at, 4, 0)
             for w in (8, 4, 2, 1) for at in (0, 8 - shift, 16384 - shift, 4096 * w)]  # fmt: skip
    spans += [Span(_geo(outer=16, block_bytes=1024, blocks=4, word=w), 1 << 19, 2, 4096) for w in (8, 2)]
    _check(buf, spans)


def test_random_layouts_match_the_per_run_digests() -> None:
    rng = random.Random(7)
    batched = 0
    for trial in range(20):
        buf = _buffer(4 << 20, shift=rng.choice([0, 0, 0, 2]), seed=trial)
        spans = []
        for _ in range(rng.randint(1, 60)):
            word = rng.choice([8, 8, 8, 4, 2, 1])
            outer = rng.choice([1, 1, 2, 7, 64])
            block_bytes = word * rng.choice([1, 3, 8, 64, 96, 512, 2048, 2048 * 3, 4096])
            if block_bytes * outer > 256 << 10:
                continue
            count = rng.randint(1, 4)
            stride = block_bytes * count + rng.choice([0, 0, word, MIN_CELL, 4096]) if outer > 1 else 0
            end = (outer - 1) * stride + count * block_bytes
            at = rng.randrange(0, (4 << 20) - end, rng.choice([1, word, 64, 4096]))
            spans.append(Span(_geo(outer=outer, block_bytes=block_bytes, blocks=count, word=word), at, count, stride))
        if spans:
            batched += len(spans) - _check(buf, spans).per_run
    assert batched > 100


def test_shapes_of_more_cells_than_kept_make_their_gather_index_each_run(monkeypatch) -> None:
    monkeypatch.setattr(digest_batch, "_INDEX_CACHED", 0)
    buf = _buffer(1 << 20)
    spans = [Span(_geo(outer=64, block_bytes=256, blocks=8, word=8), 0, 8, 2048),
             Span(_geo(outer=1, block_bytes=16 << 10, blocks=8, word=4), 256 << 10, 8, 0)]  # fmt: skip
    assert _check(buf, spans).per_run == 0


def test_runs_in_several_buffers_are_batched_together() -> None:
    # Direct reads: runs in the engine tensors they landed in, some at odd addresses; one gather per shape.
    buffers = {f"t{i}": _buffer(256 << 10, shift=(0, 0, 2, 4)[i % 4], seed=i) for i in range(6)}
    spans, names = [], []
    for i, name in enumerate(buffers):
        for at, geo in [(0, _geo(outer=1, block_bytes=32 << 10, blocks=4, word=8)),
                        (128 << 10, _geo(outer=16, block_bytes=1024, blocks=4, word=2 if i % 2 else 8))]:  # fmt: skip
            spans.append(Span(geo, at, geo.blocks, geo.row_bytes))
            names.append(name)
    bases = {n: b.data_ptr() % 8 for n, b in buffers.items()}
    batch = BlockBatch(spans, names, buffers["t0"].device, bases)
    assert sorted(batch.order) == list(range(len(spans))) and batch.per_run < len(spans)
    want = torch.cat([digest.block_digests(buffers[names[i]], spans[i].at, spans[i].geo, spans[i].count,
                                           spans[i].row_stride) for i in batch.order])  # fmt: skip
    assert torch.equal(torch.cat(batch.run(buffers)), want)


def test_a_buffer_that_moved_is_read_where_it_is_now() -> None:
    buffers = {"a": _buffer(64 << 10), "b": _buffer(64 << 10, seed=1)}
    spans = [Span(_geo(outer=1, block_bytes=4096, blocks=8, word=8), 0, 8, 0)] * 2
    batch = BlockBatch(spans, ["a", "b"], torch.device("cpu"), dict.fromkeys(buffers, 0))
    first = torch.cat(batch.run(buffers))
    moved = {"a": buffers["a"].clone(), "b": buffers["b"]}
    moved["a"][100] ^= 1
    again = torch.cat(batch.run(moved))
    assert not torch.equal(first, again)
    assert torch.equal(again, torch.cat([digest.block_digests(moved[n], 0, spans[0].geo, 8, 0) for n in "ab"]))


def test_narrow_cells_and_far_runs_get_regions_of_their_own() -> None:
    buf = _buffer(4 << 20)
    wide = _geo(outer=1, block_bytes=16 << 10, blocks=4, word=8)
    narrow = _geo(outer=64, block_bytes=16, blocks=4, word=8)  # 16-byte column blocks: 16-byte cells
    spans = [Span(wide, 0, 4, 0), Span(narrow, 64 << 10, 4, 64), Span(wide, 128 << 10, 4, 0),
             Span(wide, 3 << 20, 4, 0)]  # fmt: skip
    batch = _check(buf, spans)
    assert batch.per_run == 0
    # The narrow run alone in 16-byte cells; the wide ones around it share one; the far one its own.
    regions = sorted((r.fine, r.hi - r.lo) for r in batch._regions)
    assert regions == [(16, 4096), (16 << 10, 64 << 10), (16 << 10, 192 << 10)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_side_stream_the_batch_is_captured_once_and_replays_what_the_buffers_hold_now() -> None:
    # Two batches sharing one pool per stream, as a receiver's chunks and direct batches do: captured on
    # first run, replayed after, in either order (reads land in any order), results read after both ran.
    device = torch.device("cuda", torch.cuda.current_device())
    slots = [_buffer(4 << 20, seed=s).to(device) for s in (0, 1)]
    spans = [[Span(_geo(outer=1, block_bytes=64 << 10, blocks=16, word=8), 0, 16, 0),
              Span(_geo(outer=64, block_bytes=1024, blocks=4, word=2), 1 << 20, 4, 4096)],
             [Span(_geo(outer=1, block_bytes=8 << 10, blocks=8, word=4), 512, 8, 0),
              Span(_geo(outer=1, block_bytes=64 << 10, blocks=16, word=8), (2 << 20) + 8, 16, 0)]]  # fmt: skip
    pools: dict[int, object] = {}
    batches = [BlockBatch(s, [None] * len(s), device, {None: 0}, pools) for s in spans]
    assert batches[1].per_run == 1  # a run left to `digest.block_digests`, captured with the rest
    stream = torch.cuda.Stream(device)
    for round_ in range(4):
        for slot in slots:
            slot[round_ * 4096 : round_ * 4096 + 64] ^= 0x5A  # new contents every round
        stream.wait_stream(torch.cuda.current_stream(device))
        got = {}
        with torch.cuda.stream(stream):
            for i in ((0, 1), (1, 0))[round_ % 2]:
                got[i] = batches[i].run({None: slots[i]})
        stream.synchronize()
        for i, b in enumerate(batches):
            assert torch.equal(torch.cat(got[i]), _per_run(slots[i], spans[i], b.order))
    assert len(pools) == 1 and all(len(b._graphs) == 1 and None not in b._graphs.values() for b in batches)
    # On the default stream nothing is captured: the ops run as they are issued.
    assert torch.equal(torch.cat(batches[0].run({None: slots[0]})), _per_run(slots[0], spans[0], batches[0].order))
