"""Chunks of whole layers (`refit.plan.layered`): what a vLLM worker streams through a small window.

The synthetic trainers of test_assemble.py; the layers are vLLM's (`VLLMEngine.layer_of`): the
decoder layer, else the module holding the tensor. Each chunk is staged into a buffer of its own size
and the targets it completes are assembled from it alone (`assemble_chunk`): they must equal the
targets cut from the global tensors, every layer must be whole in exactly one chunk, and no chunk may
exceed half the window. A window whose half is smaller than a layer is refused, naming the layer.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from refit.errors import ConfigError
from refit.plan.assemble import assemble_chunk
from refit.plan.planner import plan_refit
from refit.plan.targets import EngineLayout, Target
from tests.unit.test_assemble import expected, global_tensors, meta, stage, trainer

VOCAB, PADDED = 61, 64
LAYERS = 4


def _tensors() -> dict:
    """test_assemble's model with `LAYERS` decoder layers (layer k: layer 0's tensors times k + 1)."""
    base = global_tensors(PADDED)
    out = {n: rt for n, rt in base.items() if ".layers." not in n}
    for k in range(LAYERS):
        for n, (role, t) in base.items():
            if ".layers.0." in n:
                out[n.replace(".layers.0.", f".layers.{k}.")] = (role, t * (k + 1))
    return out


def layer_of(t: Target) -> tuple[int, str]:
    m = re.match(r"^(model\.layers\.(\d+))\.", t.hf_name)
    if m:
        return int(m[2]) + 1, m[1]
    module = t.hf_name.rpartition(".")[0]
    return (0 if "embed" in module else 1 << 30), module


def _plan(trainer_tp: int, engine_tp: int, window: int | None):
    tensors = _tensors()
    sources, buffers = trainer(tensors, trainer_tp)
    layout = EngineLayout(tp_rank=engine_tp - 1, tp_size=engine_tp, vocab_size=VOCAB)
    model = dataclasses.replace(meta(VOCAB, PADDED), num_layers=LAYERS)
    plan = plan_refit(model=model, sources=sources, layout=layout, window=window, layer_of=layer_of)
    return plan, tensors, buffers


@pytest.mark.parametrize("trainer_tp", [1, 2, 4])
@pytest.mark.parametrize("engine_tp", [1, 2])
def test_chunks_hold_whole_layers_and_assemble_exactly(trainer_tp: int, engine_tp: int) -> None:
    whole, _, _ = _plan(trainer_tp, engine_tp, None)
    assert len(whole.chunks) == 1 and not whole.chunks[0].targets  # no window: installed whole
    layers = {layer_of(t)[1] for t in whole.targets}
    seen_chunks = set()
    # From the whole set down: each window either streams whole layers or is refused naming one.
    for window in range(whole.staging_bytes, 0, -max(whole.staging_bytes // 40, 1)):
        try:
            plan, tensors, buffers = _plan(trainer_tp, engine_tp, window)
        except ConfigError as exc:
            assert re.search(rf"layer \S+ needs \d+ staging bytes.*max_staging_bytes={window}", str(exc)), exc
            continue
        if len(plan.chunks) == 1:
            assert plan.staging_bytes <= window and not plan.chunks[0].targets
            continue
        seen_chunks.add(len(plan.chunks))
        assert all(c.staging_bytes <= window // 2 for c in plan.chunks)
        assert plan.staging_bytes <= window
        placed = [layer for c in plan.chunks for layer in c.layers]
        assert sorted(placed) == sorted(layers)  # every layer in exactly one chunk
        assert placed == sorted(placed, key=lambda n: layer_of(next(t for t in plan.targets
                                                                    if layer_of(t)[1] == n)))  # fmt: skip
        got: dict[str, torch.Tensor] = {}
        for chunk in plan.chunks:
            in_chunk = {t.hf_name for t in plan.targets if layer_of(t)[1] in chunk.layers}
            assert set(chunk.targets) == in_chunk
            sources = {t.source for t in plan.targets if t.hf_name in in_chunk}
            assert {p.tensor for p in chunk.pieces} <= sources  # nothing of another layer
            out = assemble_chunk(plan, chunk, stage(chunk, buffers))  # a chunk stages like a plan
            assert set(out) == in_chunk
            got.update(out)
        for t in plan.targets:
            assert torch.equal(got[t.hf_name], expected(t, tensors[t.source][1])), t.hf_name
    assert max(seen_chunks) >= 3, seen_chunks


def test_a_layer_over_half_the_window_is_refused_naming_it() -> None:
    whole, _, _ = _plan(1, 1, None)
    with pytest.raises(ConfigError, match=r"layer model\.layers\.\d needs \d+ staging bytes.*max_staging_bytes=64"):
        _plan(1, 1, 64)
    assert whole.staging_bytes > 64


def test_a_tensor_feeding_two_layers_cannot_be_streamed() -> None:
    tensors = global_tensors(PADDED)
    sources, _ = trainer(tensors, 1)
    # q and k of one Megatron tensor put in different layers: no chunk could complete either alone.
    split = lambda t: (1, "a") if "q_proj" in t.hf_name else layer_of(t)  # noqa: E731
    with pytest.raises(Exception, match="feeds two engine layers"):
        plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=EngineLayout(vocab_size=VOCAB), window=256,
                   layer_of=split)  # fmt: skip
