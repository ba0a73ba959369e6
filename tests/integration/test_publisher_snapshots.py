"""Snapshot mode of a real Megatron trainer: which versions stay readable, and what close() leaves behind.

Runs on the session's trainer cluster (real megatron-core on CPU, gloo, real NIXL, a real catalog).
The worker-side steps that only these tests need are defined here and run on every trainer rank as
`HERE:function`.
"""

from __future__ import annotations

import warnings

import pytest

from refit import Receiver
from refit.catalog.client import CatalogClient
from refit.engines import HFEngine
from refit.errors import VersionRetiredError
from tests.support import hf_models as hm
from tests.support.refit_harness import OPS, assert_same_weights

HERE = "tests.integration.test_publisher_snapshots"


def close_publisher_strictly(state: dict, rank: int, world_size: int, *, name: str) -> None:
    """Close a publisher with deprecation warnings as errors, as Python 3.14 treats `NotImplemented` in a test."""
    pub = state["publishers"].pop(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        pub.close()


def states(catalog: str, name: str, versions: list[int]) -> dict[int, str]:
    with CatalogClient(catalog) as client:
        return {v: client.get_version(name=name, version=v).state.value for v in versions}


def test_two_slots_keep_the_last_two_versions_whatever_their_numbers(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    t.publish(2, snapshots=2)
    v4 = t.step(seed=4)
    t.publish(4, snapshots=2)
    v6 = t.step(seed=6)
    t.publish(6, snapshots=2)
    t.step(seed=7)  # training goes on: the live weights are none of the published versions
    assert states(catalog, t.name, [2, 4, 6]) == {2: "RETIRED", 4: "READY", 6: "READY"}
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=9)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv:
        assert rcv.update_weights(version=4).version == 4
        assert_same_weights(engine_model, v4)
        assert rcv.update_weights(version=6).version == 6
        assert_same_weights(engine_model, v6)
        with pytest.raises(VersionRetiredError):
            rcv.update_weights(version=2)
        assert_same_weights(engine_model, v6)


def test_close_in_snapshot_mode_retires_the_snapshots_and_releases_the_claim(trainer, catalog, trainer_cluster) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    t.publish(1, snapshots=2)
    t.step(seed=2)
    t.publish(2, snapshots=2)
    assert states(catalog, t.name, [1, 2]) == {1: "READY", 2: "READY"}
    trainer_cluster.run(f"{HERE}:close_publisher_strictly", name=t.name)
    assert states(catalog, t.name, [1, 2]) == {1: "RETIRED", 2: "RETIRED"}
    # Every rank was released: a new publisher claims it without takeover.
    out = trainer_cluster.run(f"{OPS}:second_publisher", key=t.name, catalog=catalog, name=t.name)
    assert set(out) == {"ok"}
