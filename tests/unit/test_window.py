"""Bounded staging in the planner: direct reads and chunks that stream through a window.

The same synthetic trainers as test_assemble.py. A streamed plan is carried out by hand: direct
reads copy trainer bytes straight into the engine's tensors, each chunk is staged into a buffer of
its own size and scattered into them; the result must equal the target cut from the global tensor.
"""

from __future__ import annotations

import pytest
import torch

from refit.dtypes import torch_dtype
from refit.errors import ConfigError
from refit.plan.assemble import scatter, zero_padding
from refit.plan.planner import Plan, plan_refit
from refit.plan.targets import EngineLayout, Target
from tests.unit.test_assemble import NG, expected, global_tensors, meta, stage, trainer

VOCAB, PADDED = 61, 64


def run(plan: Plan, buffers: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Carry out a plan into fresh engine tensors (filled with garbage first)."""
    dests = {t.hf_name: torch.full(t.shape, float("nan"), dtype=torch_dtype(t.dtype)) for t in plan.targets}
    for d in plan.direct:
        raw = buffers[d.rank][d.remote_offset : d.remote_offset + d.nbytes]
        dests[d.target].view(-1).view(torch.uint8)[d.offset : d.offset + d.nbytes].copy_(raw)
    for chunk in plan.chunks:
        scatter(chunk.pieces, plan.targets, stage(chunk, buffers), dests)  # a chunk reads like a plan
    zero_padding(plan.targets, dests)
    return dests


def check(plan: Plan, tensors: dict, buffers: dict[int, torch.Tensor]) -> None:
    got = run(plan, buffers)
    for t in plan.targets:
        assert torch.equal(got[t.hf_name], expected(t, tensors[t.source][1])), t.hf_name


@pytest.mark.parametrize("trainer_tp", [1, 2, 4])
@pytest.mark.parametrize("engine_tp", [1, 2])
@pytest.mark.parametrize("window", [None, 4096, 1024, 64])
@pytest.mark.parametrize("direct", [False, True])
def test_streamed_plans_give_every_target_its_rows(trainer_tp: int, engine_tp: int, window: int | None,
                                                   direct: bool) -> None:  # fmt: skip
    tensors = global_tensors(PADDED)
    sources, buffers = trainer(tensors, trainer_tp)
    plan = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=EngineLayout(tp_rank=engine_tp - 1,
                      tp_size=engine_tp, vocab_size=VOCAB), window=window,
                      direct=(lambda t: True) if direct else None)  # fmt: skip
    check(plan, tensors, buffers)
    if window is not None:
        # No chunk above its share of the window (the smallest row a piece can be cut to is 64 bytes
        # here), and the staging held at once within the window.
        share = window // plan.slots
        assert all(c.staging_bytes <= max(share, 64) for c in plan.chunks) or len(plan.chunks) == 1
        assert plan.staging_bytes <= max(window, 64 * plan.slots)
    if direct and trainer_tp == engine_tp:
        # Matched TP: norms and row-parallel shards are whole trainer runs, read straight in.
        assert {d.target for d in plan.direct} >= {"model.norm.weight", "model.layers.0.self_attn.o_proj.weight"}
    if not direct:
        assert not plan.direct
    # Every needed byte is moved once: by a direct read or by a chunk.
    assert plan.total_bytes == sum(p.nbytes for p in plan.pieces) + plan.direct_bytes


def test_fused_qkv_and_gate_up_are_read_directly_one_run_per_part() -> None:
    tensors = global_tensors(PADDED)
    sources, buffers = trainer(tensors, 1)
    plan = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=EngineLayout(vocab_size=VOCAB),
                      direct=lambda t: True)  # fmt: skip
    runs: dict[str, int] = {}
    for d in plan.direct:
        runs[d.target] = runs.get(d.target, 0) + 1
    # q, k and v interleave by query group in Megatron's fused tensor: one run per group and part,
    # each contiguous in the trainer and in the engine's q_proj, k_proj or v_proj.
    for name in ("q_proj", "k_proj", "v_proj"):
        assert runs[f"model.layers.0.self_attn.{name}.weight"] == NG
    # Gate and up are each one half of the trainer's fc1 at TP1.
    assert runs["model.layers.0.mlp.gate_proj.weight"] == runs["model.layers.0.mlp.up_proj.weight"] == 1
    assert not plan.pieces  # everything landed directly
    check(plan, tensors, buffers)


def test_row_slices_of_a_wider_trainer_shard_are_staged() -> None:
    # Trainer TP1 -> engine TP2: a row-parallel weight's columns are strided in the trainer shard.
    tensors = global_tensors(PADDED)
    sources, buffers = trainer(tensors, 1)
    plan = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=EngineLayout(tp_rank=1, tp_size=2,
                      vocab_size=VOCAB), direct=lambda t: True)  # fmt: skip
    direct = {d.target for d in plan.direct}
    assert "model.layers.0.self_attn.o_proj.weight" not in direct
    assert "model.layers.0.mlp.down_proj.weight" not in direct
    assert "model.layers.0.self_attn.q_proj.weight" in direct  # column-parallel rows stay contiguous
    check(plan, tensors, buffers)


def test_chunks_draw_from_every_trainer_rank() -> None:
    tensors = global_tensors(PADDED)
    sources, _ = trainer(tensors, 2)
    plan = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=EngineLayout(vocab_size=VOCAB), window=4096)
    assert len(plan.chunks) > 2
    # Chunks read from both trainer ranks (but for a tail where one rank's share ran out first), so
    # both links carry them, unlike chunks cut in address order (all of rank 0, then all of rank 1).
    both = sum({r.rank for r in c.reads} == {0, 1} for c in plan.chunks)
    assert both >= 0.75 * len(plan.chunks)


def test_accept_decides_which_targets_are_direct() -> None:
    tensors = global_tensors(PADDED)
    sources, buffers = trainer(tensors, 1)

    def only_norms(t: Target) -> bool:
        return t.hf_name.endswith("norm.weight")

    plan = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=EngineLayout(vocab_size=VOCAB),
                      direct=only_norms)  # fmt: skip
    assert plan.direct and all(d.target.endswith("norm.weight") for d in plan.direct)
    check(plan, tensors, buffers)


def test_a_non_positive_window_is_refused() -> None:
    sources, _ = trainer(global_tensors(PADDED), 1)
    with pytest.raises(ConfigError, match="window"):
        plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=EngineLayout(vocab_size=VOCAB), window=0)


def test_whole_runs_have_their_own_threshold_and_split_pieces_keep_theirs() -> None:
    # A link without a descriptor cost (copies over CUDA IPC): a piece that is one run of one engine
    # tensor (a norm, gate and up each at TP1) goes direct whatever its size, while QKV, cut into one
    # run per query group and part, stays staged below `direct_min_bytes`.
    tensors = global_tensors(PADDED)
    sources, buffers = trainer(tensors, 1)
    layout = EngineLayout(vocab_size=VOCAB)
    big = 1 << 40
    staged_all = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=layout, direct=lambda t: True,
                            direct_min_bytes=big)  # fmt: skip
    assert not staged_all.direct
    plan = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=layout, direct=lambda t: True,
                      direct_min_bytes=big, direct_min_whole=1)  # fmt: skip
    direct = {d.target for d in plan.direct}
    runs: dict[str, int] = {}
    for d in plan.direct:
        runs[d.target] = runs.get(d.target, 0) + 1
    assert all(n == 1 for n in runs.values())  # only whole runs
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight", "lm_head.weight"} <= direct  # fmt: skip
    assert not direct & {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"}
    assert plan.pieces  # QKV, cut into a run per query group and part, is staged
    check(plan, tensors, buffers)
