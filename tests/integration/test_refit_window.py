"""Bounded staging on real parts: a staging window far smaller than the model, so every refit streams
through many chunks, and direct reads straight into the engine's parameters; bit-exact against the HF
ground truth across the layout matrix, with the staging held measured.
"""

from __future__ import annotations

import pytest

from refit import Receiver
from refit.engines import HFEngine
from tests.integration.test_refit import LAYOUTS
from tests.support import hf_models as hm
from tests.support.refit_harness import OPS, assert_same_logits, assert_same_weights

WINDOW = 64 << 10  # bytes: the test models are a few MB, so dozens of chunks


@pytest.mark.parametrize(("case", "layout"), LAYOUTS)
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
        assert_same_weights(engine_model, t.hf)
        assert_same_logits(engine_model, t.hf)
        v2 = t.step(seed=2)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        r2 = rcv.update_weights()
        assert r2.version == 2
        assert_same_weights(engine_model, v2)
        assert_same_logits(engine_model, v2)
        # The staging held never exceeded the window, and the parameters kept their storage.
        assert 0 < rcv.stats.peak_staging_bytes <= WINDOW
        assert r2.staging_bytes <= WINDOW
        assert storage == {n: p.data_ptr() for n, p in engine_model.named_parameters()}
