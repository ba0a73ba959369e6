"""The one refit state machine (`refit.vllm.flow`) with a fake engine control: every path and error path.

The fake stands in for the eight calls `LLM`, `AsyncLLM` and the HTTP server make (the real ones run in
tests/integration/test_vllm_*.py); it records each call and fails the ones a test names. The runners are
the production ones; a fake clock makes the deadlines exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from typing import Any

import pytest

from refit.errors import (
    ConfigError,
    EngineError,
    ModelMismatchError,
    RankVersionMismatchError,
    RefitError,
    TransferTimeoutError,
    VersionNotReadyError,
)
from refit.vllm import flow
from refit.vllm.flow import RefitPlan, Step, refit_steps

V = 3
PLAN = RefitPlan(catalog="catalog:1", name="policy", version=V, ready=True, replica=1, timeout_s=30.0, poll_s=0.001)
SWAP = ["pause", "start", ("update", V), ("finish", str(V)), "reset", "resume"]


class FakeEngine:
    """A `Control` over a fake engine of `ranks` TP ranks that pulls for `polls` status calls.

    `fail` maps a call ("init", "prefetch", "status", "pause", ...) to the exception it raises; `calls`
    records what was called, `("update", v)` / `("finish", weight_version)` with their argument.
    """

    def __init__(
        self,
        *,
        ranks: int = 2,
        polls: int = 1,
        fail: dict[str, BaseException] | None = None,
        reset: bool | None = True,
        pull_error: str | None = None,
    ) -> None:
        self.ranks, self.polls, self.fail = ranks, polls, fail or {}
        self.reset_reply, self.pull_error = reset, pull_error
        self.calls: list[Any] = []
        self.installed: int | None = None

    def _call(self, name: str, arg: Any = None) -> None:
        self.calls.append(name if arg is None and name not in ("finish",) else (name, arg))
        if name in self.fail:
            raise self.fail[name]

    def _statuses(self, version: int | None) -> list[dict[str, Any]]:
        out = []
        for rank in reversed(range(self.ranks)):  # ranks answer in any order
            s: dict[str, Any] = {"tp_rank": rank, "version": version, "installed": self.installed}
            s["last"] = {"install_s": 0.5 + rank} if self.installed is not None else {}
            if self.pull_error is not None:
                s.update(state="failed", error="the model differs", error_type=self.pull_error)
            elif self.polls > 0:
                s["state"] = "pulling"
            else:
                s.update(state="staged", bytes=100 * (rank + 1), wire_s=0.25 * (rank + 1))
            out.append(s)
        return out

    def init(self, info: dict[str, Any]) -> None:
        self._call("init")
        self.info = info

    def rpc(self, **kwargs: Any) -> list[dict[str, Any]]:
        op = kwargs["op"]
        self._call(op)
        if op == "prefetch":
            self.version = kwargs["version"]
        else:
            self.polls -= 1
        return self._statuses(self.version)

    def pause(self) -> None:
        self._call("pause")

    def start(self) -> None:
        self._call("start")

    def update(self, version: int) -> None:
        self._call("update", version)
        self.installed = version

    def finish(self, weight_version: str | None) -> None:
        self._call("finish", weight_version)

    def reset(self) -> bool | None:
        self._call("reset")
        return self.reset_reply

    def resume(self) -> None:
        self._call("resume")


class AsyncFakeEngine:
    """The same fake as an `AsyncControl` (each call yields to the event loop once)."""

    def __init__(self, **kwargs: Any) -> None:
        self.sync = FakeEngine(**kwargs)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.sync, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            return method(*args, **kwargs)

        return call


def _run(engine: FakeEngine, plan: RefitPlan = PLAN, **kwargs: Any) -> flow.RefitReport:
    return flow.run(refit_steps(plan, **kwargs), engine)


def _swap_calls(engine: FakeEngine) -> list[Any]:
    return [c for c in engine.calls if c not in ("init", "prefetch", "status")]


# -- the path without errors -------------------------------------------------------------------------------


def test_refit_runs_every_step_in_order_and_reports() -> None:
    engine = FakeEngine(polls=2)
    r = _run(engine)
    assert engine.calls == ["init", "prefetch", "status", "status", *SWAP, "status"]
    assert engine.info == {
        "catalog": "catalog:1",
        "name": "policy",
        "replica": 1,
        "timeout_s": 30.0,
        "catalog_timeout_s": PLAN.catalog_timeout_s,
    }
    assert r.version == V and r.bytes_per_rank == (100, 200) and r.bytes == 300
    assert r.wire_s == 0.5 and r.install_s == 1.5
    assert 0 <= r.prefetch_s <= r.seconds and 0 <= r.stall_s <= r.seconds


def test_the_machine_asks_the_catalog_first_unless_the_version_is_known_ready() -> None:
    plan = RefitPlan(catalog="catalog:1", name="policy", timeout_s=7.0, catalog_timeout_s=2.0)
    steps = refit_steps(plan)
    first = next(steps)
    assert first == Step(
        op="resolve",
        kwargs={"catalog": "catalog:1", "name": "policy", "version": None, "timeout_s": 7.0, "catalog_timeout_s": 2.0},
    )
    init = steps.send(5)  # the catalog's answer
    assert init.op == "init" and init.kwargs["info"]["catalog_timeout_s"] == 2.0
    assert steps.send(None) == Step(op="rpc", kwargs={"op": "prefetch", "version": 5})
    assert next(refit_steps(PLAN)).op == "init"


def test_init_info_forwards_the_catalog_timeout() -> None:
    info = flow.init_info(catalog="c:1", name="n", replica=2, timeout_s=9.0, catalog_timeout_s=3.0)
    assert info == {"catalog": "c:1", "name": "n", "replica": 2, "timeout_s": 9.0, "catalog_timeout_s": 3.0}
    with pytest.raises(ConfigError, match="catalog_timeout_s"):
        flow.init_info(catalog="c:1", catalog_timeout_s=0)


def test_a_prefix_cache_that_could_not_be_reset_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine(reset=False)
    with caplog.at_level(logging.WARNING, logger="refit.vllm.flow"):
        r = _run(engine)
    assert r.version == V and _swap_calls(engine)[-1] == "resume"
    assert "prefix cache could not be reset" in caplog.text


def test_an_engine_that_does_not_say_whether_it_reset_is_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="refit.vllm.flow"):
        assert _run(FakeEngine(reset=None)).version == V
    assert not caplog.records


def test_the_sync_runner_needs_no_event_loop_and_works_under_a_running_one() -> None:
    async def inside_a_loop() -> flow.RefitReport:
        return _run(FakeEngine())  # a sync refit called from async code: no nested asyncio.run

    assert asyncio.run(inside_a_loop()).version == V


# -- before the pause: nothing stops serving -------------------------------------------------------------


def test_a_failed_pull_raises_the_workers_error_before_anything_pauses() -> None:
    engine = FakeEngine(pull_error="ModelMismatchError")
    with pytest.raises(ModelMismatchError, match="TP rank 1: the model differs"):
        _run(engine)
    assert engine.calls == ["init", "prefetch"]


def test_a_refused_prefetch_call_is_an_engine_error_before_anything_pauses() -> None:
    engine = FakeEngine(fail={"prefetch": Exception("Call to collective_rpc method failed: boom")})
    with pytest.raises(EngineError, match=r"prefetch of v3.*boom") as refused:
        _run(engine)
    assert type(refused.value.__cause__) is Exception
    assert engine.calls == ["init", "prefetch"]


def test_a_refused_init_is_an_engine_error_before_anything_else() -> None:
    engine = FakeEngine(fail={"init": RuntimeError("Worker failed with error 'invalid refit init_info'")})
    with pytest.raises(EngineError, match=r"init_weight_transfer_engine.*invalid refit init_info"):
        _run(engine)
    assert engine.calls == ["init"]


def test_a_prefetch_that_never_completes_times_out_at_its_deadline_before_anything_pauses() -> None:
    now = [0.0]

    def clock() -> float:  # one second passes between two looks at the clock
        now[0] += 1.0
        return now[0]

    engine = FakeEngine(polls=10**9)
    plan = RefitPlan(catalog="c:1", version=V, ready=True, timeout_s=5.0, grace_s=2.0, poll_s=0.001)
    with pytest.raises(TransferTimeoutError, match=r"v3 not staged on every rank after 5\.0s"):
        _run(engine, plan, clock=clock)
    # The deadline is read at 2 and falls at 2 + 5 + 2 = 9: one poll at each look at 3..9, none after.
    assert engine.calls.count("status") == 7
    assert "pause" not in engine.calls


def test_prefetch_polls_back_off_past_the_workers_busy_wait() -> None:
    # vLLM's workers spin on their cores for 1 s after each call: polls every 50 ms for a whole pull kept
    # every core busy and starved the kernel thread the pull's NIXL set-up waited on (2-core machines).
    engine = FakeEngine(polls=8)
    slept: list[float] = []
    flow.run(refit_steps(dataclasses.replace(PLAN, poll_s=0.05)), engine, sleep=slept.append)
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 1.5, 1.5]
    assert flow.PREFETCH_POLL_MAX_S > 1.0  # longer than the workers' busy wait: they idle between polls
    assert list(itertools.islice(flow.prefetch_polls(3.0), 3)) == [3.0, 3.0, 3.0]  # a longer poll_s is kept


# -- the swap: the session is closed and the engine resumed -------------------------------------------------


def test_a_refused_update_closes_the_session_resumes_and_raises_an_engine_error() -> None:
    refusal = Exception("Call to collective_rpc method failed: Worker failed with error 'TP ranks [0] could not'")
    engine = FakeEngine(fail={"update": refusal})
    with pytest.raises(EngineError, match=r"vLLM refused the update to v3: .*TP ranks \[0\]") as refused:
        _run(engine)
    assert refused.value.__cause__ is refusal
    assert _swap_calls(engine) == ["pause", "start", ("update", V), ("finish", None), "resume"]


def test_closing_the_session_may_fail_on_the_last_rank_the_update_error_is_raised() -> None:
    engine = FakeEngine(fail={"update": Exception("refused"), "finish": Exception("no update active")})
    with pytest.raises(EngineError, match="refused"):
        _run(engine)
    assert _swap_calls(engine) == ["pause", "start", ("update", V), ("finish", None), "resume"]


def test_a_refit_error_from_the_engine_keeps_its_class() -> None:
    engine = FakeEngine(fail={"update": RankVersionMismatchError("asked for versions [1, 2]")})
    with pytest.raises(RankVersionMismatchError):
        _run(engine)
    assert _swap_calls(engine)[-2:] == [("finish", None), "resume"]


@pytest.mark.parametrize("bug", [TypeError("update() got an unexpected keyword"), AttributeError("no attribute")])
def test_a_programming_error_is_not_disguised_as_an_engine_refusal(bug: Exception) -> None:
    engine = FakeEngine(fail={"update": bug})
    with pytest.raises(type(bug)) as raised:
        _run(engine)
    assert raised.value is bug and not isinstance(raised.value, RefitError)
    assert _swap_calls(engine)[-2:] == [("finish", None), "resume"]


@pytest.mark.parametrize("step", ["pause", "start", "finish", "reset"])
def test_a_failed_swap_step_resumes_once_and_raises_an_engine_error(step: str) -> None:
    engine = FakeEngine(fail={step: RuntimeError(f"{step} failed")})
    with pytest.raises(EngineError, match=f"{step} failed"):
        _run(engine)
    calls = _swap_calls(engine)
    assert calls.count("resume") == 1 and calls[-1] == "resume"
    failed_at = [c if isinstance(c, str) else c[0] for c in calls].index(step)
    assert calls[failed_at + 1 :] == ["resume"]  # nothing after the failed step but the resume


def test_a_failed_resume_after_a_successful_install_raises() -> None:
    engine = FakeEngine(fail={"resume": RuntimeError("engine dead")})
    with pytest.raises(EngineError, match=r"resume after the update to v3.*engine dead"):
        _run(engine)
    assert _swap_calls(engine) == SWAP


def test_a_failed_resume_after_a_failed_update_is_logged_and_the_update_error_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = FakeEngine(fail={"update": Exception("refused"), "resume": RuntimeError("engine dead")})
    with caplog.at_level(logging.ERROR, logger="refit.vllm.flow"), pytest.raises(EngineError, match="refused"):
        _run(engine)
    assert "could not resume" in caplog.text and "engine dead" in caplog.text


def test_an_interrupt_during_the_install_still_resumes() -> None:
    engine = FakeEngine(fail={"update": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        _run(engine)
    assert _swap_calls(engine) == ["pause", "start", ("update", V), "resume"]


# -- the async runner ------------------------------------------------------------------------------------------


def test_the_async_runner_runs_the_same_steps_without_blocking_the_loop() -> None:
    engine = AsyncFakeEngine(polls=3)
    ticks: list[int] = []

    async def scenario() -> flow.RefitReport:
        async def ticker() -> None:
            while True:
                ticks.append(len(engine.sync.calls))
                await asyncio.sleep(0)

        other = asyncio.create_task(ticker())
        try:
            return await flow.run_async(refit_steps(PLAN), engine)
        finally:
            other.cancel()

    r = asyncio.run(scenario())
    assert r.version == V and r.bytes == 300
    assert engine.sync.calls == ["init", "prefetch", "status", "status", "status", *SWAP, "status"]
    assert len(set(ticks)) > 3  # the other task ran between the refit's calls


def test_the_async_runner_closes_the_session_and_resumes_after_a_refused_update() -> None:
    engine = AsyncFakeEngine(fail={"update": Exception("refused")})
    with pytest.raises(EngineError, match="refused"):
        asyncio.run(flow.run_async(refit_steps(PLAN), engine))
    assert _swap_calls(engine.sync) == ["pause", "start", ("update", V), ("finish", None), "resume"]


def test_a_cancelled_async_refit_resumes_the_engine_before_it_ends() -> None:
    engine = AsyncFakeEngine()
    blocked = asyncio.Event()

    async def update(version: int) -> None:
        engine.sync.calls.append(("update", version))
        blocked.set()
        await asyncio.sleep(3600)  # cancelled long before

    engine.update = update  # type: ignore[attr-defined]

    async def scenario() -> None:
        task = asyncio.create_task(flow.run_async(refit_steps(PLAN), engine))
        await asyncio.wait_for(blocked.wait(), timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)

    asyncio.run(scenario())
    assert _swap_calls(engine.sync) == ["pause", "start", ("update", V), "resume"]


# -- pure helpers ----------------------------------------------------------------------------------------------


def _status(rank: int, state: str, version: int | None = V, **extra: Any) -> dict[str, Any]:
    return {"tp_rank": rank, "state": state, "version": version, **extra}


def test_prefetch_done_once_every_rank_has_the_version_staged() -> None:
    assert flow.prefetch_done([_status(0, "staged"), _status(1, "staged")], V)
    assert not flow.prefetch_done([_status(0, "staged"), _status(1, "pulling")], V)
    assert not flow.prefetch_done([_status(0, "staged"), _status(1, "staged", version=V - 1)], V)
    assert not flow.prefetch_done([_status(0, "idle", version=None)], V)
    # A failure of an older pull is not this version's: the new prefetch replaces it.
    assert not flow.prefetch_done([_status(0, "failed", version=V - 1, error_type="TransportError")], V)


def test_prefetch_done_raises_the_first_failed_ranks_error_by_class_name() -> None:
    statuses = [
        _status(0, "staged"),
        _status(1, "failed", error="ranks [3] never published", error_type="VersionNotReadyError"),
    ]
    with pytest.raises(VersionNotReadyError, match=r"TP rank 1: ranks \[3\] never published"):
        flow.prefetch_done(statuses, V)


def test_error_from_status_keeps_refit_classes_and_names_any_other() -> None:
    assert type(flow.error_from_status(_status(0, "failed", error="x", error_type="TransportError"))).__name__ == (
        "TransportError"
    )
    other = flow.error_from_status(_status(2, "failed", error="bad key", error_type="KeyError"))
    assert type(other) is EngineError and str(other) == "KeyError: TP rank 2: bad key"
    # A name in refit.errors that is not a RefitError class is not instantiated.
    odd = flow.error_from_status(_status(0, "failed", error="x", error_type="Sequence"))
    assert type(odd) is EngineError


def test_report_orders_ranks_and_takes_the_slowest() -> None:
    staged = [
        _status(1, "staged", bytes=20, wire_s=0.5),
        _status(0, "staged", bytes=10, wire_s=0.25),
    ]
    after = [{"tp_rank": 0, "last": {"install_s": 2.0}}, {"tp_rank": 1, "last": {}}]
    r = flow.report(version=V, staged=staged, after=after, times={"prefetch": 1.0, "stall": 2.5, "total": 4.0})
    assert r == flow.RefitReport(
        version=V,
        bytes=30,
        bytes_per_rank=(10, 20),
        wire_s=0.5,
        prefetch_s=1.0,
        stall_s=2.5,
        install_s=2.0,
        seconds=4.0,
    )


def test_close_session_ignores_the_last_ranks_error() -> None:
    closed = []

    def finish() -> None:
        closed.append(True)
        raise Exception("no weight update is active")

    flow.close_session(finish)
    assert closed == [True]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"catalog": ""},
        {"catalog": "c:1", "replica": -1},
        {"catalog": "c:1", "timeout_s": 0},
        {"catalog": "c:1", "poll_s": 0},
        {"catalog": "c:1", "catalog_timeout_s": -1},
        {"catalog": "c:1", "grace_s": -1},
        {"catalog": "c:1", "version": -1},
        {"catalog": "c:1", "ready": True},
    ],
)
def test_a_bad_plan_is_refused_before_any_call(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        RefitPlan(**kwargs)


def test_a_step_names_a_known_call() -> None:
    with pytest.raises(ConfigError, match="unknown refit step"):
        Step(op="sleep_forever")
