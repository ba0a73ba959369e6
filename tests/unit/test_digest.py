"""Block digests (refit/digest.py) and the receiver's check (refit/plan/verify.py), without processes.

The digest is checked against an independent pure-Python evaluation of its formula; the check runs
on real plans whose reads are carried out by copying bytes out of trainer "regions" (what NIXL does),
so every slice layout a receiver reads is exercised: row ranges, per-query-group QKV rows, gate/up
halves, strided column slices (packed and enclosed), vocab cuts, merged ranges and direct reads.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from refit import digest
from refit.catalog import wire
from refit.dtypes import torch_dtype
from refit.engines.base import EngineSpec
from refit.errors import DigestError, LayoutError
from refit.plan.assemble import mirrored_groups
from refit.plan.planner import plan_refit
from refit.plan.records import Chunk
from refit.plan.verify import DigestIndex, Verifier
from refit.types import ModelMeta, ParallelCoords, Region, Role, SourceRecord, TensorDesc

H, NH, NG, D, F, VP = 128, 8, 2, 16, 256, 256
META = ModelMeta(architecture="llama", num_layers=1, hidden_size=H, num_attention_heads=NH, num_query_groups=NG,
                 kv_channels=D, ffn_hidden_size=F, padded_vocab_size=VP)  # fmt: skip
TENSORS = {
    "embedding.word_embeddings.weight": (Role.VOCAB_PARALLEL, (VP, H)),
    "decoder.layers.0.input_layernorm.weight": (Role.REPLICATED, (H,)),
    "decoder.layers.0.self_attention.linear_qkv.weight": (Role.QKV_COLUMN, ((NH + 2 * NG) * D, H)),
    "decoder.layers.0.self_attention.linear_proj.weight": (Role.ROW, (H, NH * D)),
    "decoder.layers.0.pre_mlp_layernorm.weight": (Role.REPLICATED, (H,)),
    "decoder.layers.0.mlp.linear_fc1.weight": (Role.GATED_MLP_COLUMN, (2 * F, H)),
    "decoder.layers.0.mlp.linear_fc2.weight": (Role.ROW, (H, F)),
    "decoder.final_layernorm.weight": (Role.REPLICATED, (H,)),
    "output_layer.weight": (Role.VOCAB_PARALLEL, (VP, H)),
}
M64 = 1 << 64


def reference(data: bytes, geo: digest.Geometry) -> list[int]:
    """The digest of every block of a shard's bytes, straight from the formula, in Python integers."""
    ws, q = geo.word, geo.block_bytes // geo.word
    words = np.frombuffer(data, dtype={8: "<i8", 4: "<i4", 2: "<i2", 1: "u1"}[ws]).astype(object)
    row_words = geo.row_bytes // ws if geo.outer > 1 else geo.blocks * q
    lane = math.gcd(q, digest.LINE_WORDS)
    out = []
    for j in range(geo.blocks):
        block = [int(w) for r in range(geo.outer) for w in words[r * row_words + j * q : r * row_words + (j + 1) * q]]
        lines = [sum(block[i : i + lane]) for i in range(0, len(block), lane)]
        value = sum((2 * m + 1) * s for m, s in enumerate(lines)) % M64
        out.append(value - M64 if value >= 1 << 63 else value)
    return out


def _desc(shape: tuple[int, ...], role: Role, dtype: str, size: int = 1) -> TensorDesc:
    return digest.with_blocks(TensorDesc.shard(name="t", role=role, dtype=dtype, global_shape=shape, size=size))


def _bytes(desc: TensorDesc, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (desc.nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("shape", "role", "dtype", "size"),
    [
        ((64, 48), Role.COLUMN, "float32", 2),  # row blocks of int64 words
        ((40, 96), Role.ROW, "bfloat16", 2),  # column blocks over every row
        ((6, 10), Role.ROW, "bfloat16", 1),  # column blocks of int32 words
        ((7,), Role.REPLICATED, "bfloat16", 1),  # one block of int16 words
        ((3, 3), Role.REPLICATED, "int8", 1),  # one block of bytes
        ((2, 4, 8), Role.ROW, "float16", 2),  # column blocks of a 3-D shard
    ],
)
def test_the_digest_is_its_formula_for_every_word_size(shape, role, dtype, size) -> None:
    desc = _desc(shape, role, dtype, size)
    data = _bytes(desc)
    geo = digest.geometry(desc)
    assert geo is not None and geo.blocks >= 1
    got = digest.shard_digests(data, desc)
    assert got is not None and got.tolist() == reference(data.numpy().tobytes(), geo)


def test_every_single_byte_change_and_moved_data_change_the_digest() -> None:
    desc = _desc((16, 64), Role.COLUMN, "bfloat16", 1)
    data = _bytes(desc)
    base = digest.shard_digests(data, desc)
    assert base is not None
    for at in range(desc.nbytes):
        for bit in (0x01, 0x80):
            flipped = data.clone()
            flipped[at] ^= bit
            assert not torch.equal(digest.shard_digests(flipped, desc), base), (at, bit)
    swapped = data.clone().view(-1, 512)
    swapped[[0, 1]] = swapped[[1, 0]]  # two 512-byte runs trade places
    assert not torch.equal(digest.shard_digests(swapped.view(-1), desc), base)


def test_a_misaligned_or_strided_copy_of_the_blocks_digests_the_same() -> None:
    desc = _desc((32, 64), Role.ROW, "float32", 2)
    geo = digest.geometry(desc)
    data = _bytes(desc)
    whole = digest.shard_digests(data, desc)
    # Blocks 2..3 of every row, staged packed at an odd offset (the aligned-copy path).
    rows = data.view(geo.outer, geo.row_bytes)
    packed = rows[:, 2 * geo.block_bytes : 4 * geo.block_bytes].reshape(-1)
    buf = torch.zeros(packed.numel() + 3, dtype=torch.uint8)
    buf[3:] = packed
    got = digest.block_digests(buf, 3, geo, 2, 2 * geo.block_bytes)
    assert torch.equal(got, whole[2:4])


def test_blocks_fall_on_the_cuts_of_engines_up_to_eight_times_the_trainer_tp() -> None:
    # Llama-3-8B's shards at trainer TP1: every engine TP up to 8 cuts on block boundaries.
    cases = {
        "qkv": (Role.QKV_COLUMN, (6144, 4096), 768),  # one query group: 768 rows
        "fc1": (Role.GATED_MLP_COLUMN, (28672, 4096), 14336 // 8),
        "fc2": (Role.ROW, (4096, 14336), 14336 // 8),
        "o_proj": (Role.ROW, (4096, 4096), 4096 // 8),
    }
    for name, (role, shape, cut) in cases.items():
        desc = digest.with_blocks(TensorDesc.shard(name=name, role=role, dtype="bfloat16", global_shape=shape))
        geo = digest.geometry(desc)
        assert cut % desc.digest_block == 0 and geo.block_bytes * geo.outer <= digest.BLOCK_BYTES, name
        assert geo.word == 8, name


def test_digests_and_block_sizes_survive_the_wire() -> None:
    (src,) = _sources(tp=1)
    back = wire.source_from_bytes(wire.source_to_bytes(src))
    assert back == src and back.digests.values and back.digests.algorithm == digest.ALGORITHM
    _, head, layout = wire.source_encodings(src)
    assert wire.source_from_bytes(head).digests == src.digests  # kept when tensors are omitted
    # The layout digest does not depend on the digest values (a plan is reused across versions).
    other = SourceRecord(
        **{**{f: getattr(src, f) for f in src.__dataclass_fields__}, "digests": _sources(1, 9)[0].digests}
    )
    assert wire.source_encodings(other)[2] == layout


# -- the receiver's check on real plans --------------------------------------------------------------------


def _sources(tp: int, seed: int = 0, dp: int = 1) -> list[SourceRecord]:
    out = []
    for rank in range(tp * dp):
        tp_rank = rank % tp
        descs, offset = [], 0
        for name, (role, shape) in TENSORS.items():
            desc = TensorDesc.shard(name=name, role=role, dtype="float32", global_shape=shape, rank=tp_rank, size=tp,
                                    byte_offset=offset)  # fmt: skip
            descs.append(digest.with_blocks(desc))
            offset += -(-desc.nbytes // 256) * 256
        coords = ParallelCoords(tp_rank=tp_rank, tp_size=tp, dp_rank=rank // tp, dp_size=dp)
        region = Region(index=0, addr=1 << 20, nbytes=offset)
        out.append(SourceRecord(rank=rank, coords=coords, agent_name=f"a{rank}", agent_metadata=b"m",
                                regions=(region,), tensors=tuple(descs)))  # fmt: skip
    return [_with_digests(s, _memory(s, seed)) for s in out]


def _memory(src: SourceRecord, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100 + src.coords.tp_rank)  # DP replicas hold equal bytes
    return torch.randint(0, 256, (src.regions[0].nbytes,), dtype=torch.uint8, generator=gen)


def _with_digests(src: SourceRecord, mem: torch.Tensor) -> SourceRecord:
    fields = {f: getattr(src, f) for f in src.__dataclass_fields__}
    return SourceRecord(**{**fields, "digests": digest.pack([digest.shard_digests(mem, t) for t in src.tensors])})


def _refit(
    sources,
    memory,
    *,
    engine_tp: int,
    rank: int,
    window: int | None,
    direct: bool,
    batched: bool = False,
    mapped: bool = False,
) -> Verifier:
    """Plan engine rank `rank`, carry out its reads by copying from `memory`, verify every chunk and direct
    read (each chunk's digests `batched`, or run by run: `digest.block_digests`, the reference). `mapped`:
    each chunk's pieces are checked where the trainer holds them (a receiver that copies them out of its
    mapped memory instead of staging them), in `memory` itself."""
    spec = EngineSpec.from_meta(META, tp_rank=rank, tp_size=engine_tp)
    plan = plan_refit(model=META, sources=sources, layout=spec.layout(), window=window,
                      direct=(lambda t: True) if direct else None, direct_min_bytes=1)  # fmt: skip
    verifier = Verifier(DigestIndex(sources), sources, version=1, batched=batched)
    dests = {t.hf_name: torch.zeros(t.shape, dtype=torch_dtype(t.dtype)) for t in plan.targets}
    for d in plan.direct:
        dest = dests[d.target].view(-1).view(torch.uint8)
        dest[d.offset : d.offset + d.nbytes] = memory[d.rank][d.remote_offset : d.remote_offset + d.nbytes]
    verifier.direct(plan.direct, dests)
    for chunk in plan.chunks:
        if mapped:
            for (src, _), group in mirrored_groups(chunk.pieces):
                verifier.pieces(group, memory[src])
        else:
            verifier.pieces(chunk.pieces, _staged(chunk, memory))
    assert verifier.verified_bytes + verifier.unverified_bytes >= plan.total_bytes
    return verifier


LAYOUTS = [  # trainer TP, DP, engine TP, staging window, direct reads
    pytest.param(1, 1, 1, None, False, id="tp1-whole"),
    pytest.param(2, 1, 1, None, False, id="tp2-to-1-whole"),
    pytest.param(1, 2, 2, None, False, id="tp1-to-2-slices"),
    pytest.param(1, 4, 4, 64 << 10, True, id="tp1-to-4-window-direct"),
    pytest.param(2, 2, 4, 32 << 10, False, id="tp2-to-4-window"),
    pytest.param(2, 1, 8, None, False, id="tp2-to-8-slices"),
    pytest.param(4, 2, 2, 32 << 10, True, id="tp4-to-2-window-direct"),
]


@pytest.mark.parametrize(("tp", "dp", "engine_tp", "window", "direct"), LAYOUTS)
def test_every_byte_a_receiver_pulls_is_verified(tp, dp, engine_tp, window, direct) -> None:
    sources = _sources(tp, dp=dp)
    memory = {s.rank: _memory(s, 0) for s in sources}
    for rank in range(engine_tp):
        counts = set()
        for batched in (False, True):
            v = _refit(sources, memory, engine_tp=engine_tp, rank=rank, window=window, direct=direct, batched=batched)
            assert v.unverified_bytes == 0 and v.verified_bytes > 0
            counts.add(v.verified_bytes)
            mapped = _refit(sources, memory, engine_tp=engine_tp, rank=rank, window=window, direct=direct,
                            batched=batched, mapped=True)  # fmt: skip
            assert mapped.unverified_bytes == 0 and mapped.verified_bytes >= v.verified_bytes
        assert len(counts) == 1


@pytest.mark.parametrize(("tp", "dp", "engine_tp", "window", "direct"), LAYOUTS)
@pytest.mark.parametrize("tensor", ["linear_proj.weight", "linear_qkv.weight", "linear_fc1.weight", "output_layer"])
@pytest.mark.parametrize("batched", [False, True], ids=["per-run", "batched"])
@pytest.mark.parametrize("mapped", [False, True], ids=["staged", "mapped"])
def test_a_flipped_byte_is_found_by_the_rank_that_reads_it(
    tp, dp, engine_tp, window, direct, tensor, batched, mapped
) -> None:
    sources = _sources(tp, dp=dp)
    memory = {s.rank: _memory(s, 0) for s in sources}
    for s in sources:  # every replica: whichever one the planner picks
        desc = next(t for t in s.tensors if t.name.startswith(tensor) or t.name.endswith(tensor))
        memory[s.rank][desc.byte_offset + desc.nbytes // 2 + 1] ^= 0x04
    failed = []
    for rank in range(engine_tp):
        try:
            _refit(sources, memory, engine_tp=engine_tp, rank=rank, window=window, direct=direct, batched=batched,
                   mapped=mapped)  # fmt: skip
        except DigestError as exc:
            assert tensor in exc.tensor and exc.rank >= 0 and exc.version == 1
            assert f"{exc.tensor} from trainer rank {exc.rank}" in str(exc)
            failed.append(rank)
    assert failed  # the byte is read by some engine rank, and that rank refuses it


@pytest.mark.parametrize("batched", [False, True], ids=["per-run", "batched"])
def test_direct_reads_are_checked_in_the_engine_tensors_of_each_refit(batched) -> None:
    # The layout of a direct batch is kept with the plan; the engine tensors it reads may be new ones.
    sources = _sources(1)
    memory = {s.rank: _memory(s, 0) for s in sources}
    plan = plan_refit(model=META, sources=sources, layout=EngineSpec.from_meta(META, tp_rank=0, tp_size=1).layout(),
                      direct=lambda t: True, direct_min_bytes=1)  # fmt: skip
    index = DigestIndex(sources)
    for refit in range(3):
        dests = {t.hf_name: torch.zeros(t.shape, dtype=torch_dtype(t.dtype)) for t in plan.targets}
        for d in plan.direct:
            dest = dests[d.target].view(-1).view(torch.uint8)
            dest[d.offset : d.offset + d.nbytes] = memory[d.rank][d.remote_offset : d.remote_offset + d.nbytes]
        verifier = Verifier(index, sources, version=1, batched=batched)
        if refit == 2:  # a corrupted byte in the new tensors
            dests[plan.direct[0].target].view(-1).view(torch.uint8)[plan.direct[0].offset + 5] ^= 0x10
            with pytest.raises(DigestError):
                verifier.direct(plan.direct, dests)
        else:
            verifier.direct(plan.direct, dests)
            assert verifier.verified_bytes == sum(d.nbytes for d in plan.direct)


def test_a_vocab_cut_leaves_its_last_partial_block_unverified_and_says_so() -> None:
    meta = ModelMeta(**{**{f: getattr(META, f) for f in META.__dataclass_fields__}, "vocab_size": 250})
    sources = _sources(1)
    memory = {s.rank: _memory(s, 0) for s in sources}
    spec = EngineSpec.from_meta(meta, tp_rank=0, tp_size=1)
    plan = plan_refit(model=meta, sources=sources, layout=spec.layout())
    verifier = Verifier(DigestIndex(sources), sources, version=1)
    slot = torch.zeros(plan.chunks[0].staging_bytes, dtype=torch.uint8)
    for r in plan.chunks[0].reads:
        slot[r.local_offset : r.local_offset + r.nbytes] = memory[r.rank][r.remote_offset : r.remote_offset + r.nbytes]
    verifier.pieces(plan.chunks[0].pieces, slot)
    block = next(t for t in sources[0].tensors if t.name == "output_layer.weight").digest_block
    # Rows [block * (250 // block), 250) of both vocab tables sit in a block the engine reads in part.
    assert verifier.unverified_bytes == 2 * (250 % block) * H * 4


def test_a_record_with_the_wrong_number_of_digests_is_refused() -> None:
    (src,) = _sources(1)
    short = SourceRecord(**{**{f: getattr(src, f) for f in src.__dataclass_fields__},
                            "digests": type(src.digests)(algorithm="x", values=src.digests.values[8:])})  # fmt: skip
    with pytest.raises(LayoutError, match="trainer rank 0 sent"):
        Verifier(DigestIndex([src]), [short], version=1)


def test_expect_rebinds_the_digests_and_a_refused_answer_changes_nothing() -> None:
    # A pull begun ahead of the catalog digests what lands; the answer's digests are bound later
    # (on another thread), and an answer with other ranks' digests is refused without binding them.
    old, new = _sources(2, seed=0), _sources(2, seed=1)
    memory = {s.rank: _memory(s, 1) for s in new}  # the bytes of the new version
    spec = EngineSpec.from_meta(META, tp_rank=0, tp_size=1)
    plan = plan_refit(model=META, sources=old, layout=spec.layout(), direct=lambda t: True, direct_min_bytes=1)
    dests = {t.hf_name: torch.zeros(t.shape, dtype=torch_dtype(t.dtype)) for t in plan.targets}
    for d in plan.direct:
        dest = dests[d.target].view(-1).view(torch.uint8)
        dest[d.offset : d.offset + d.nbytes] = memory[d.rank][d.remote_offset : d.remote_offset + d.nbytes]
    verifier = Verifier(DigestIndex(old), old, version=1)
    pending = verifier.launch_direct(plan.direct, dests)
    unsigned = [SourceRecord(**{**{f: getattr(s, f) for f in s.__dataclass_fields__}, "digests": type(s.digests)()})
                if s.rank == 1 else s for s in new]  # fmt: skip
    with pytest.raises(LayoutError, match=r"trainer ranks \[0\] publish digests, not \[0, 1\]"):
        verifier.expect(unsigned, 2)
    with pytest.raises(DigestError, match="v1: "):  # still the old version's digests
        verifier.compare(pending)
    verifier.expect(new, 2)
    verifier.compare(verifier.launch_direct(plan.direct, dests))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_cpu_digests_are_identical() -> None:
    for shape, role, dtype in [((4096, 1024), Role.COLUMN, "bfloat16"), ((512, 2048), Role.ROW, "float32"),
                               ((7,), Role.REPLICATED, "bfloat16")]:  # fmt: skip
        desc = _desc(shape, role, dtype, 2)
        data = _bytes(desc, seed=3)
        assert torch.equal(digest.shard_digests(data.cuda(), desc).cpu(), digest.shard_digests(data, desc))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("tp", "dp", "engine_tp", "window", "direct"), LAYOUTS)
def test_batched_cuda_digests_match_the_trainers(tp, dp, engine_tp, window, direct) -> None:
    sources = _sources(tp, dp=dp)
    memory = {s.rank: _memory(s, 0) for s in sources}
    spec = EngineSpec.from_meta(META, tp_rank=0, tp_size=engine_tp)
    plan = plan_refit(model=META, sources=sources, layout=spec.layout(), window=window)
    verifier = Verifier(DigestIndex(sources), sources, version=1)  # batched: the default on a GPU
    for chunk in plan.chunks:
        verifier.pieces(chunk.pieces, _staged(chunk, memory).cuda())
    assert verifier.unverified_bytes == 0 and verifier.verified_bytes > 0


def _staged(chunk: Chunk, memory: dict[int, torch.Tensor]) -> torch.Tensor:
    """A staging slot holding `chunk` as its reads land it, from each trainer rank's `memory`."""
    slot = torch.zeros(max(chunk.staging_bytes, 1), dtype=torch.uint8)
    for r in chunk.reads:
        for i in range(r.count):
            src = memory[r.rank][r.remote_offset + i * r.remote_stride :][: r.block_bytes]
            slot[r.local_offset + i * r.block_bytes :][: r.block_bytes] = src
    return slot
