"""The refit state machine after a streamed install tore an engine's weights (`refit.vllm.flow`).

A streamed (windowed) vLLM install writes layers while it still pulls; when it fails after the first
write (a read failed, the version was retired mid-pull) its ranks report `torn`. The machine must then
install the newest READY version while the engine is still paused, and resume only once that
succeeded; otherwise raise `TornWeightsError` and leave the engine paused. The fake engine of
test_vllm_flow.py, torn by its first `tears` updates; the catalog lookup answers `NEWEST`.
"""

from __future__ import annotations

from typing import Any

import pytest

from refit.errors import EngineError, TornWeightsError, VersionRetiredError
from refit.vllm import flow
from refit.vllm.flow import RefitPlan, refit_steps
from tests.unit.test_vllm_flow import PLAN, FakeEngine, V

NEWEST = V + 2
RETIRED = "version 3 of 'policy' became retired during the pull; the engine's weights are mixed until a refit completes"


class TornEngine(FakeEngine):
    """Its first `tears` updates fail part-way: the ranks report `torn` until an update succeeds."""

    def __init__(self, *, tears: int, **kwargs: Any) -> None:
        super().__init__(polls=0, **kwargs)
        self.tears, self.torn = tears, False

    def _statuses(self, version: int | None) -> list[dict[str, Any]]:
        return [{**s, "torn": self.torn} for s in super()._statuses(version)]

    def update(self, version: int) -> None:
        self.calls.append(("update", version))
        if self.tears > 0:
            self.tears -= 1
            self.torn = True
            raise VersionRetiredError(RETIRED)
        self.torn, self.installed = False, version


@pytest.fixture(autouse=True)
def catalog(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    asked: list[dict[str, Any]] = []

    def resolve(**kwargs: Any) -> int:
        asked.append(kwargs)
        return NEWEST

    monkeypatch.setattr(flow, "resolve_version", resolve)
    return asked


def _swap(engine: FakeEngine) -> list[Any]:
    return [c for c in engine.calls if c not in ("init", "prefetch")]


def test_a_torn_install_is_repaired_with_the_newest_version_before_resuming(catalog) -> None:
    engine = TornEngine(tears=1)
    plan = RefitPlan(catalog="catalog:1", name="policy", version=None, timeout_s=30.0, poll_s=0.001)
    catalog.clear()
    r = flow.run(refit_steps(plan), engine)
    assert r.version == NEWEST and r.repairs == 1 and engine.installed == NEWEST
    calls = _swap(engine)
    failed = calls.index(("finish", None))
    assert calls[failed + 1 :] == ["status", "start", ("update", NEWEST), ("finish", str(NEWEST)), "reset", "status",
                                   "resume", "status"]  # fmt: skip
    assert calls.count("pause") == 1 and calls.count("resume") == 1
    assert [k["version"] for k in catalog] == [None, None]  # the plan's lookup, then the repair's


def test_a_pinned_version_that_tore_is_repaired_then_reported_retired() -> None:
    engine = TornEngine(tears=1)
    with pytest.raises(VersionRetiredError, match=rf"v{V} was retired .* repaired with v{NEWEST} .* and resumed"):
        flow.run(refit_steps(PLAN), engine)
    assert engine.installed == NEWEST and engine.calls[-1] == "status" and "resume" in engine.calls


def test_an_engine_that_stays_torn_is_reported_and_left_paused() -> None:
    engine = TornEngine(tears=1 + flow.REPAIR_ATTEMPTS)
    with pytest.raises(TornWeightsError, match=r"weights a mix of versions.*left paused") as raised:
        flow.run(refit_steps(PLAN), engine)
    assert isinstance(raised.value, EngineError) and isinstance(raised.value.__cause__, VersionRetiredError)
    assert "resume" not in engine.calls
    updates = [c for c in engine.calls if isinstance(c, tuple) and c[0] == "update"]
    assert updates == [("update", V)] + [("update", NEWEST)] * flow.REPAIR_ATTEMPTS


def test_a_failed_install_that_did_not_tear_resumes_on_the_old_weights_without_repair(catalog) -> None:
    engine = FakeEngine(polls=0, fail={"update": EngineError("refused before any write")})
    with pytest.raises(EngineError, match="refused before any write"):
        flow.run(refit_steps(PLAN), engine)
    assert _swap(engine)[-3:] == [("finish", None), "status", "resume"] and not catalog


def test_report_counts_chunks_prefetched_and_streamed() -> None:
    staged = [{"tp_rank": 0, "bytes": 10, "wire_s": 0.1, "staging_bytes": 64, "chunks": 5, "prefetched_chunks": 2}]
    r = flow.report(version=1, staged=staged, after=[{"last": {"install_s": 0.2}}],
                    times={"prefetch": 1.0, "stall": 0.5, "total": 2.0})  # fmt: skip
    assert (r.chunks, r.prefetched_chunks, r.staging_bytes, r.repairs) == (5, 2, 64, 0)
    whole = flow.report(version=1, staged=[{"tp_rank": 0, "bytes": 10}], after=[{"last": {}}],
                        times={"prefetch": 1.0, "stall": 0.5, "total": 2.0})  # fmt: skip
    assert (whole.chunks, whole.prefetched_chunks) == (1, 1)


def test_the_window_reaches_the_workers_init_info() -> None:
    info = flow.init_info(catalog="c:1", max_staging_bytes=1 << 20)
    assert info["max_staging_bytes"] == 1 << 20 and "max_staging_bytes" not in flow.init_info(catalog="c:1")
    with pytest.raises(Exception, match="max_staging_bytes"):
        RefitPlan(catalog="c:1", max_staging_bytes=0)
