"""Refits pulled ahead of the catalog's answer (`refit.ahead`): the receiver reads the trainers' version
words, pulls at once and asks the catalog meanwhile. Real trainer processes, NIXL and catalog; the
weights are compared with the Hugging Face ground truth of each step."""

from __future__ import annotations

import pytest

from refit import Receiver
from refit.catalog.client import CatalogClient
from refit.engines import HFEngine
from refit.errors import VersionRetiredError
from tests.support import hf_models as hm
from tests.support.refit_harness import OPS, assert_same_weights

WINDOW = 64 << 10  # small: chunks stream beside the direct reads


def _next(t, version: int, seed: int):
    t.cluster.run(f"{OPS}:invalidate", name=t.name)
    hf = t.step(seed=seed)
    t.publish(version)
    return hf


@pytest.mark.parametrize("direct", [True, False])
def test_refits_after_the_first_are_pulled_ahead_and_exact(trainer, catalog, direct: bool) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    t.publish(1)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, max_staging_bytes=WINDOW,
                  direct=direct) as rcv:  # fmt: skip
        assert rcv.update_weights().version == 1  # no plan yet: through the catalog
        assert rcv.stats.ahead == 0
        assert_same_weights(engine_model, t.hf)
        v2 = _next(t, 2, seed=2)
        assert rcv.update_weights().version == 2
        assert (rcv.stats.ahead, rcv.stats.ahead_missed) == (1, 0)
        assert_same_weights(engine_model, v2)
        v3 = _next(t, 3, seed=3)
        assert rcv.update_weights(version=3).version == 3  # pinned, the words hold it: ahead too
        assert (rcv.stats.ahead, rcv.stats.ahead_missed) == (2, 0)
        assert_same_weights(engine_model, v3)
        assert rcv.update_weights().version == 3  # nothing newer in the words: through the catalog
        assert rcv.stats.ahead == 2
        assert rcv.stats.verified_bytes > 0 and rcv.stats.unverified_bytes == 0


def test_a_pull_ahead_the_catalog_does_not_confirm_is_pulled_again_through_it(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    t.publish(1)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, max_staging_bytes=WINDOW) as rcv:
        rcv.update_weights()
        _next(t, 2, seed=2)
        with CatalogClient(catalog) as client:
            client.retire(name=t.name, version=2)  # an operator retires v2; the trainers' words still hold it
        with pytest.raises(VersionRetiredError):
            rcv.update_weights(version=2)  # ahead, then refused by the catalog's answer, then by the catalog
        assert (rcv.stats.ahead, rcv.stats.ahead_missed) == (1, 1)
        assert rcv.torn  # the pull ahead wrote the engine: it must not serve until a refit completes
        v3 = _next(t, 3, seed=3)
        assert rcv.update_weights().version == 3
        assert not rcv.torn
        assert_same_weights(engine_model, v3)


def test_a_step_racing_a_pull_ahead_is_never_installed(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    t.publish(1)
    state: dict = {}
    race: list = []

    def after_wire(version: int) -> None:
        if race:
            race.pop()()

    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, max_staging_bytes=WINDOW,
                  on_after_wire=after_wire) as rcv:  # fmt: skip
        rcv.update_weights()
        _next(t, 2, seed=2)
        race.append(lambda: state.update(v3=_next(t, 3, seed=3)))  # a step between the pull of v2 and its re-check
        assert rcv.update_weights().version == 3  # v2 pulled ahead, found retired by the words, v3 pulled again
        assert rcv.stats.ahead >= 1
        assert_same_weights(engine_model, state["v3"])
        assert not rcv.torn
