"""Versions, torn-read safety and bad input, on the same real parts as test_refit.py.

In every failure case the engine must keep its previous weights, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch

from refit import Receiver
from refit.catalog.client import CatalogClient
from refit.engines import HFEngine
from refit.engines.base import EngineSpec, TensorSpec
from refit.errors import (
    CatalogUnavailableError,
    ConfigError,
    ModelMismatchError,
    VersionNotFoundError,
    VersionNotReadyError,
    VersionRetiredError,
)
from tests.support import hf_models as hm
from tests.support.refit_harness import OPS, assert_same_weights


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"


def test_pinned_older_version_from_snapshots_then_retired_when_its_slot_is_reused(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    t.publish(1, snapshots=2)
    v2 = t.step(seed=2)  # no invalidate needed: snapshots keep version 1 readable
    t.publish(2, snapshots=2)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv:
        assert rcv.update_weights(version=1).version == 1
        assert_same_weights(engine_model, t.hf)
        assert rcv.update_weights().version == 2
        assert_same_weights(engine_model, v2)
        t.step(seed=3)
        t.publish(3, snapshots=2)  # reuses version 1's slot: version 1 is retired first
        before = snapshot(engine_model)
        with pytest.raises(VersionRetiredError):
            rcv.update_weights(version=1)
        assert_unchanged(engine_model, before)


def test_optimizer_step_retires_the_live_version_before_changing_weights(trainer, catalog, trainer_cluster) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=2)
    out = trainer_cluster.run(f"{OPS}:optimizer_step_retires", key=t.name, catalog=catalog, name=t.name + "-opt")
    assert set(out) == {"READY->RETIRED"}


class Race:
    """An `on_after_wire` hook that runs a trainer step between the pull and the READY re-check once:
    the worst-timed optimizer step."""

    def __init__(self) -> None:
        self.step: Callable[[], None] | None = None
        self.versions: list[int] = []

    def __call__(self, version: int) -> None:
        self.versions.append(version)
        if self.step is not None:
            step, self.step = self.step, None
            step()


def test_a_pull_that_races_an_optimizer_step_is_never_installed(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    t.publish(1)
    race = Race()
    # Staged whole (direct=False): nothing reaches the engine before the READY re-check, so a raced
    # pull leaves the old weights. (Direct reads write the engine during the pull:
    # test_refit_stream_safety.py covers that contract.)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, on_after_wire=race, direct=False) as rcv:
        state: dict = {}

        def step_and_publish() -> None:
            t.cluster.run(f"{OPS}:invalidate", name=t.name)  # what the optimizer hook does
            state["v2"] = t.step(seed=2)  # the bytes just pulled are now overwritten
            t.publish(2)

        before = snapshot(engine_model)
        race.step = step_and_publish
        with pytest.raises(VersionRetiredError, match="during the pull"):
            rcv.update_weights(version=1)  # pinned: refused, old weights kept
        assert_unchanged(engine_model, before)

        def step3() -> None:
            t.cluster.run(f"{OPS}:invalidate", name=t.name)
            state["v3"] = t.step(seed=3)
            t.publish(3)

        race.step = step3
        result = rcv.update_weights()  # unpinned: the raced pull of v2 is discarded, v3 is pulled whole
        assert result.version == 3
        assert_same_weights(engine_model, state["v3"])
        assert race.versions == [1, 2, 3]  # the hook saw every pull, with its version


@pytest.mark.parametrize("direct", [False, True])
def test_the_re_check_reads_the_trainers_version_words(trainer, catalog, direct: bool) -> None:
    """The re-check after a pull reads each trainer rank's version word over NIXL: a rank whose word
    changed fails the refit although the catalog still says READY (a retirement on its way)."""
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    t.publish(1)
    race = Race()
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, on_after_wire=race,
                  direct=direct) as rcv:  # fmt: skip
        before = snapshot(engine_model)
        race.step = lambda: t.cluster.run(f"{OPS}:retire_word", name=t.name, ranks=[1])
        with pytest.raises(VersionRetiredError, match=r"during the pull \(its bytes on trainer rank\(s\) \[1\]"):
            rcv.update_weights(version=1)
        if not direct:
            assert_unchanged(engine_model, before)  # staged whole: nothing was installed
        else:
            assert rcv.torn  # direct reads wrote the engine: it must not serve until a refit completes
        with CatalogClient(catalog) as client:
            assert client.version_state(name=t.name, version=1).value == "READY"  # the word alone failed it
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        v2 = t.step(seed=2)
        t.publish(2)
        assert rcv.update_weights().version == 2  # the words of v2 hold v2 again
        assert_same_weights(engine_model, v2)
        assert not rcv.torn


def test_version_that_never_becomes_ready_names_the_missing_ranks(trainer, catalog, trainer_cluster) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=2)
    world = trainer_cluster.world_size
    t.publish(1, ranks=[0, 1, 2])
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    before = snapshot(engine_model)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv:
        with pytest.raises(VersionNotReadyError) as err:
            rcv.update_weights(version=1, timeout_s=1.0)
        assert err.value.missing_ranks == tuple(range(3, world))
        assert "3" in str(err.value) and str(world - 1) in str(err.value)
        with pytest.raises(VersionNotFoundError):
            rcv.update_weights(version=42, timeout_s=0.5)
    assert_unchanged(engine_model, before)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        pytest.param(hm.QWEN3_QKNORM, "architecture", id="other-architecture"),
        pytest.param(hm.LLAMA_1KV_TIED, "num_query_groups", id="other-shapes"),
    ],
)
def test_engine_that_does_not_match_the_catalog_is_refused_untouched(trainer, catalog, case, match) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    t.publish(1)
    engine_model = hm.build_hf_model(case, seed=7)
    before = snapshot(engine_model)
    with (
        Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv,
        pytest.raises(ModelMismatchError, match=match),
    ):
        rcv.update_weights()
    assert_unchanged(engine_model, before)


def test_unreachable_catalog_is_reported_and_engine_untouched() -> None:
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    before = snapshot(engine_model)
    with (
        Receiver(catalog="127.0.0.1:1", engine=HFEngine(engine_model), catalog_timeout_s=1.0) as rcv,
        pytest.raises(CatalogUnavailableError, match=r"127\.0\.0\.1:1"),
    ):
        rcv.update_weights(timeout_s=2.0)
    assert_unchanged(engine_model, before)


def test_a_deadline_of_zero_is_refused_not_taken_for_the_default() -> None:
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    with Receiver(catalog="127.0.0.1:1", engine=HFEngine(engine_model)) as rcv:
        for bad in (0, 0.0, -1.0):
            with pytest.raises(ConfigError, match="timeout_s must be > 0"):
                rcv.fetch(timeout_s=bad)
            with pytest.raises(ConfigError, match="timeout_s must be > 0"):
                rcv.update_weights(timeout_s=bad)


def test_second_publisher_for_a_taken_rank_is_refused(trainer, catalog, trainer_cluster) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    t.publish(1)
    out = trainer_cluster.run(f"{OPS}:second_publisher", key=t.name, catalog=catalog, name=t.name)
    assert set(out) == {"RankTakenError"}
    with CatalogClient(catalog) as client:
        assert client.get_version(name=t.name, version=1).state.value == "READY"


class WholeEngine:
    """An engine that only installs complete sets (no `destinations()`, as vLLM's): it cannot stream."""

    def __init__(self, inner: HFEngine) -> None:
        self.inner = inner

    def spec(self) -> EngineSpec:
        return self.inner.spec()

    def expected(self) -> Mapping[str, TensorSpec]:
        return self.inner.expected()

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def install(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.inner.install(tensors)


def test_staging_is_reported_and_a_limit_refuses_before_anything_moves(trainer, catalog) -> None:
    """For an engine that installs whole, the window is a limit: a larger refit is refused up front."""
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    t.publish(1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    before = snapshot(engine_model)
    engine = WholeEngine(HFEngine(engine_model))
    with Receiver(catalog=catalog, engine=engine, name=t.name, max_staging_bytes=1024) as rcv:
        with pytest.raises(ConfigError, match="max_staging_bytes=1024"):
            rcv.update_weights()
        assert rcv.stats.staging_bytes == 0 and rcv.stats.registrations == 0  # nothing allocated or registered
        assert rcv.plan is not None and rcv.plan.staging_bytes > 1024  # planned, then refused
    assert_unchanged(engine_model, before)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, direct=False) as rcv:
        result = rcv.update_weights()
        assert rcv.stats.staging_bytes == result.staging_bytes and rcv.stats.registrations == 1
    model_bytes = sum(p.numel() * p.element_size() for p in engine_model.parameters())
    # Staging holds one version of this rank's tensors: the model, plus at most small read-along holes.
    assert model_bytes <= result.staging_bytes < model_bytes * 1.05
