"""End to end on real parts: Megatron trainer ranks (gloo, separate processes) -> gRPC catalog ->
NIXL pulls into this process -> a Hugging Face engine, checked bit for bit against the HF model the
trainer weights were converted from.
"""

from __future__ import annotations

import itertools

import pytest

from refit import Receiver
from refit.engines import HFEngine
from tests.support import hf_models as hm
from tests.support.refit_harness import OPS, assert_same_logits, assert_same_weights

LAYOUTS = [
    pytest.param(hm.LLAMA_GQA, dict(tp=tp, pp=pp), id=f"llama-gqa-tp{tp}-pp{pp}")
    for tp, pp in itertools.product((1, 2, 4), (1, 2))
] + [
    pytest.param(hm.LLAMA_1KV_TIED, dict(tp=2, pp=1), id="llama-1kv-tied-tp2"),
    pytest.param(hm.QWEN2_BIAS, dict(tp=2, pp=2), id="qwen2-bias-tp2-pp2"),
    pytest.param(hm.QWEN3_QKNORM, dict(tp=4, pp=1), id="qwen3-qknorm-tp4"),
    pytest.param(hm.LLAMA_PADDED, dict(tp=2, pp=1), id="llama-padded-vocab-tp2"),
    pytest.param(hm.LLAMA_4L, dict(tp=1, pp=2, vpp=2), id="llama-tp1-pp2-vpp2"),
]


@pytest.mark.parametrize(("case", "layout"), LAYOUTS)
def test_refit_is_bit_exact_for_every_layout_and_two_versions(trainer, catalog, case, layout) -> None:
    t = trainer(case, **layout)
    engine_model = hm.build_hf_model(case, seed=99)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv:
        storage = {n: p.data_ptr() for n, p in engine_model.named_parameters()}
        results = t.publish(1)
        assert "READY" in {r["state"] for r in results}  # seen by whichever rank published last
        registrations = [r["registrations"] for r in results]
        r1 = rcv.update_weights()
        assert (r1.version, r1.num_tensors) == (1, len(storage))
        assert r1.bytes > 0 and r1.seconds > 0
        # The trainer ranks share this host: their version words were read from their shared pages.
        assert rcv.stats.shared_words >= r1.num_sources > 0
        assert_same_weights(engine_model, t.hf)
        assert_same_logits(engine_model, t.hf)

        v2 = t.step(seed=2)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        assert rcv.update_weights().version == 2
        assert_same_weights(engine_model, v2)
        assert_same_logits(engine_model, v2)
        # Parameters were updated in place: same storage, so holders of the tensors see new weights.
        assert storage == {n: p.data_ptr() for n, p in engine_model.named_parameters()}
    # Memory was registered once per trainer rank, not again for later versions.
    assert [r["registrations"] for r in t.publish(3)] == registrations
