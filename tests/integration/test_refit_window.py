"""Bounded staging on real parts: a staging window far smaller than the model, so every refit streams
through many chunks, and direct reads straight into the engine's parameters; bit-exact against the HF
ground truth across the layout matrix and for mixtures of experts and DeepSeek-V3's architecture, with
the staging held measured.
"""

from __future__ import annotations

import pytest

from refit import Receiver, streaming
from refit.engines import HFEngine
from refit.reads import batch_bytes, batched
from refit.staging import StagingPool
from refit.streaming import DIRECT_AT_ONCE_WINDOWS, direct_depth
from tests.integration.test_refit import LAYOUTS
from tests.integration.test_refit_mla import LAYOUTS as MLA_LAYOUTS
from tests.integration.test_refit_moe import LAYOUTS as MOE_LAYOUTS
from tests.support import hf_models as hm
from tests.support.refit_harness import OPS, assert_same_logits, assert_same_state, assert_same_weights

WINDOW = 64 << 10  # bytes: the test models are a few MB, so dozens of chunks


# Beside the dense matrix: experts (fused 3-D in the engine) from trainer EP ranks, with shared experts
# and PP; DeepSeek-V3's latent projections and router bias buffer, with and without a query latent.
EXPERT_LAYOUTS = [*MOE_LAYOUTS[:2], MLA_LAYOUTS[0], MLA_LAYOUTS[3]]


@pytest.mark.parametrize(("case", "layout"), LAYOUTS + EXPERT_LAYOUTS)
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "staged"])
def test_a_tiny_window_streams_bit_exact(trainer, catalog, case, layout, direct) -> None:
    t = trainer(case, **layout)
    engine_model = hm.build_hf_model(case, seed=99)
    storage = {n: p.data_ptr() for n, p in engine_model.named_parameters()}
    with Receiver(
        catalog=catalog, engine=HFEngine(engine_model), name=t.name, max_staging_bytes=WINDOW, direct=direct,
        direct_min_bytes=0,
    ) as rcv:  # fmt: skip
        t.publish(1)
        r1 = rcv.update_weights()
        assert r1.version == 1 and not rcv.torn
        # Streamed: many chunks, unless every byte could be read straight into the engine.
        assert r1.chunks > 1 or (direct and r1.direct_bytes == r1.bytes)
        assert (r1.direct_bytes > 0) == direct
        assert_same_state(engine_model, t.hf)
        assert_same_logits(engine_model, t.hf)
        v2 = t.step(seed=2)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        r2 = rcv.update_weights()
        assert r2.version == 2
        assert_same_state(engine_model, v2)
        assert_same_logits(engine_model, v2)
        # The staging held never exceeded the window, and the parameters kept their storage.
        assert 0 < rcv.stats.peak_staging_bytes <= WINDOW
        assert r2.staging_bytes <= WINDOW
        assert storage == {n: p.data_ptr() for n, p in engine_model.named_parameters()}


@pytest.mark.parametrize("poster", ["workers", "installing thread"])
def test_a_few_chunks_beyond_the_slots_stream_beside_direct_batches_all_in_flight(
    trainer, catalog, monkeypatch, poster
) -> None:
    # Staged chunks filling at most two windows: every batch of direct reads is in flight at once
    # (`refit.streaming.direct_depth`), and the chunks beyond the slots are pulled behind them. Between
    # GPUs the installing thread posts the first chunks and every batch, and the workers only land them;
    # here (CPU, where UCX copies while posting) that branch is taken on request.
    posts: list[int] = []  # the batches of each post made by the installing thread
    if poster == "installing thread":
        monkeypatch.setattr(streaming, "_posted_async", lambda batches: True)
        post = StagingPool.post
        monkeypatch.setattr(StagingPool, "post", lambda pool, b: posts.append(len(b)) or post(pool, b))
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    t.publish(1)
    kwargs = dict(catalog=catalog, name=t.name, direct=True, direct_min_bytes=0)
    with Receiver(engine=HFEngine(hm.build_hf_model(hm.LLAMA_GQA, seed=98)), **kwargs) as probe:
        probe.update_weights()
        staged = probe.plan.staging_bytes  # everything staged in one window
    for k in (5, 4, 6):
        engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=99)
        with Receiver(engine=HFEngine(engine_model), max_staging_bytes=3 * -(-staged // k), **kwargs) as rcv:
            posts.clear()
            r1 = rcv.update_weights()
            plan = rcv.plan
            if not plan.slot_count < len(plan.chunks) <= DIRECT_AT_ONCE_WINDOWS * plan.slot_count:
                continue
            batches = batched(plan.direct, batch_bytes(plan))
            assert direct_depth(len(plan.chunks), len(batches), plan.slot_count) == len(batches) > 1
            assert r1.version == 1 and r1.direct_bytes > 0
            assert_same_weights(engine_model, t.hf)
            v2 = t.step(seed=2)
            t.cluster.run(f"{OPS}:invalidate", name=t.name)
            t.publish(2)
            assert rcv.update_weights().version == 2 and not rcv.torn
            assert_same_weights(engine_model, v2)
            assert_same_logits(engine_model, v2)
            # Each refit posts every direct batch at once, and the chunks of its free slots one by one.
            if poster == "installing thread":
                assert posts.count(len(batches)) == 2 and set(posts) <= {1, len(batches)}
            else:
                assert posts == []
            return
    pytest.fail(f"no window gave between {plan.slot_count + 1} and {2 * plan.slot_count} chunks")
