"""The one refit of a running vLLM engine: resolve -> prefetch -> pause -> install -> finish -> reset -> resume.

`refit_llm` (`vllm.LLM`), `refit_async_llm` (`AsyncLLM`) and the fleet (one server's HTTP routes) run
this one state machine. Each gives it a `Control`: the eight engine calls the machine makes, written in
about 20 lines against its engine (`driver.py`, `fleet.py`).

Design: a sans-IO step machine. `refit_steps` is a generator that yields `Step`s (an engine call, a
sleep between polls, the catalog lookup) and receives each result, or has the step's exception thrown
back into it; it never does I/O or waits itself. Two runners execute the steps:

* `run`: plain blocking calls (`LLM`, HTTP). It needs no event loop and creates none, so it works in the
  fleet's worker threads and when the caller already runs a loop.
* `run_async`: awaits each call (`AsyncLLM`); polls are `asyncio.sleep`, and the blocking catalog lookup
  runs in a thread, so the event loop is never blocked.

The alternative, an async core with a sync runner, needs `asyncio.run` for every synchronous refit, which
fails when the calling thread already runs a loop (notebooks, async servers) and costs a loop per call.
With a step machine the sequence and all its error paths are written once, and the unit tests drive it
with a fake control and a fake clock through the runner production uses.

Error paths:

* resolve or prefetch fails (a pull that fails or times out, a catalog model that differs from the
  engine's): raised before anything pauses; the engine never stopped serving its old weights.
* `update` fails: the update session is closed on the TP ranks that still hold it open (`finish`
  without a version: the refit backend raises a failure on the last rank only), then the engine resumes.
* `update` fails after a streamed install began writing (a rank reports `torn`: a read failed, or the
  version was retired mid-pull), so the engine's weights are a mix of versions: while still paused,
  the machine installs the newest READY version (up to `REPAIR_ATTEMPTS` times), then resumes. A pinned
  version that had to be replaced raises `VersionRetiredError` after the resume. If no repair succeeds
  it raises `TornWeightsError` and does **not** resume: a torn engine never serves.
* once `pause` has been attempted, `resume` always runs, also on error or cancellation; a failed resume
  after an earlier error is logged (the earlier error is raised), after a successful install it raises.
* the engine's failures become `EngineError` (a `RefitError` keeps its class); programming errors
  (`PROGRAMMING_ERRORS`) propagate unchanged, never disguised as an engine refusal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from refit import errors
from refit.catalog.client import CatalogClient
from refit.config import DEFAULT_TIMEOUTS
from refit.errors import (
    EngineError,
    RefitError,
    TornWeightsError,
    TransferTimeoutError,
    VersionNotFoundError,
    VersionRetiredError,
)
from refit.types import VersionState
from refit.vllm.values import (
    PROGRAMMING_ERRORS,
    REPAIR_ATTEMPTS,
    AsyncControl,
    Control,
    RefitPlan,
    RefitReport,
    Step,
    init_info,
    tls_options,
)

logger = logging.getLogger(__name__)


def resolve_version(
    *,
    catalog: str,
    name: str,
    version: int | None,
    timeout_s: float,
    catalog_timeout_s: float = DEFAULT_TIMEOUTS.catalog_s,
    token: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> int:
    """The version to install: `version` once it is READY, or the newest READY one (`tls_*`: PEM files
    for a catalog served over TLS, as `CatalogClient`'s)."""
    tls = tls_options(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    with CatalogClient(catalog, timeout_s=catalog_timeout_s, token=token, **tls) as client:
        if version is not None:
            return client.wait_ready(name=name, version=version, timeout_s=timeout_s).version
        info = client.latest(name=name, state=VersionState.READY)
        if info is None:
            raise VersionNotFoundError(f"no READY version of {name!r} in the catalog at {catalog}")
        return info.version


def error_from_status(status: dict[str, Any]) -> RefitError:
    """The refit error a worker reported (by class name; nothing is unpickled)."""
    cls = getattr(errors, str(status.get("error_type")), None)
    message = f"TP rank {status.get('tp_rank')}: {status.get('error')}"
    if isinstance(cls, type) and issubclass(cls, RefitError):
        return cls(message)
    return EngineError(f"{status.get('error_type')}: {message}")


def prefetch_done(statuses: Sequence[dict[str, Any]], version: int) -> bool:
    """True once every rank has `version` staged; raises the first rank's error if a pull failed."""
    for s in statuses:
        if s.get("version") == version and s.get("state") == "failed":
            raise error_from_status(s)
    return all(s.get("version") == version and s.get("state") == "staged" for s in statuses)


def report(
    *,
    version: int,
    staged: Sequence[dict[str, Any]],
    after: Sequence[dict[str, Any]],
    times: dict[str, float],
    repairs: int = 0,
) -> RefitReport:
    """The `RefitReport` of the ranks' statuses when staged and after the install, and the caller's times."""
    per_rank = tuple(int(s.get("bytes", 0)) for s in sorted(staged, key=lambda s: s["tp_rank"]))
    return RefitReport(
        version=version,
        bytes=sum(per_rank),
        bytes_per_rank=per_rank,
        # A streamed install pulls the chunks past the window during the pause: its ranks' last
        # install counts the whole pull, the prefetch only the first chunks.
        wire_s=max(float(s.get("wire_s", 0.0)) for s in [*staged, *(a.get("last", {}) for a in after)]),
        prefetch_s=times["prefetch"],
        stall_s=times["stall"],
        install_s=max(float(s.get("last", {}).get("install_s", 0.0)) for s in after),
        seconds=times["total"],
        staging_bytes=max(int(s.get("staging_bytes", 0)) for s in staged),
        chunks=max(int(s.get("chunks", 1)) for s in staged),
        prefetched_chunks=min(int(s.get("prefetched_chunks", 1)) for s in staged),
        repairs=repairs,
    )


def close_session(finish: Callable[[], Any]) -> None:
    """After a failed `update_weights`, end the update session on the TP ranks that still hold it open.

    The refit backend raises a failure on the last TP rank only (vLLM's executor mis-pairs replies
    otherwise), so the other ranks' sessions stay open; `finish_weight_update` closes them, and raises
    on the last rank, whose session vLLM already closed.
    """
    try:
        finish()
    except Exception:
        logger.debug("closing the failed update session", exc_info=True)


# -- the machine ----------------------------------------------------------------------------------------------

Machine = Generator[Step, Any, RefitReport]


def refit_steps(plan: RefitPlan, *, clock: Callable[[], float] = time.perf_counter) -> Machine:
    """The refit of one engine as steps (see the module docstring); returns its `RefitReport`."""
    t0 = clock()
    if plan.ready and plan.version is not None:  # RefitPlan refuses ready without a version
        version = plan.version
    else:
        version = yield Step(
            op="resolve",
            kwargs={
                "catalog": plan.catalog,
                "name": plan.name,
                "version": plan.version,
                "timeout_s": plan.timeout_s,
                "catalog_timeout_s": plan.catalog_timeout_s,
                **({"token": plan.token} if plan.token is not None else {}),
                **_tls(plan),
            },
        )
    info = init_info(
        catalog=plan.catalog,
        name=plan.name,
        replica=plan.replica,
        timeout_s=plan.timeout_s,
        catalog_timeout_s=plan.catalog_timeout_s,
        token=plan.token,
        max_staging_bytes=plan.max_staging_bytes,
        **_tls(plan),
    )
    yield from _call("init", "init_weight_transfer_engine", info=info)
    staged = yield from _prefetch(plan, version, clock)
    t_pause = clock()
    installed, repairs = version, 0
    try:
        yield from _call("pause", f"to pause for the update to v{version}")
        installed, repairs, repaired = yield from _install_or_repair(plan, version)
        staged = repaired or staged
    except GeneratorExit:  # the runner abandoned the machine: nothing may be yielded any more
        raise
    except TornWeightsError:  # a torn engine must not serve: it stays paused
        raise
    except BaseException:
        yield from _resume(version, after_error=True)
        raise
    yield from _resume(installed, after_error=False)
    t_resume = clock()
    after = yield from _call("rpc", "the refit backend's status", op="status")
    times = {"prefetch": t_pause - t0, "stall": t_resume - t_pause, "total": clock() - t0}
    out = report(version=installed, staged=staged, after=after, times=times, repairs=repairs)
    logger.info(
        "refit v%d: %d bytes (%s per rank), wire %.3fs, stall %.3fs (install %.3fs, %d chunk(s))",
        installed,
        out.bytes,
        out.bytes_per_rank,
        out.wire_s,
        out.stall_s,
        out.install_s,
        out.chunks,
    )
    if installed != version and plan.version is not None:
        raise VersionRetiredError(
            f"v{version} was retired during its streamed install; the engine was repaired with v{installed} "
            "(the newest READY version) and resumed"
        )
    return out


def _tls(plan: RefitPlan) -> dict[str, str]:
    return tls_options(tls_ca=plan.tls_ca, tls_cert=plan.tls_cert, tls_key=plan.tls_key)


def _call(call: str, what: str, /, **kwargs: Any) -> Generator[Step, Any, Any]:
    """One engine call; its failure becomes an EngineError unless it is a RefitError or a programming error."""
    try:
        return (yield Step(op=call, kwargs=kwargs))
    except (RefitError, *PROGRAMMING_ERRORS):
        raise
    except Exception as exc:
        raise EngineError(f"vLLM refused {what}: {exc}") from exc


# The longest wait between a prefetch's status polls. vLLM's workers busy-wait (sched_yield on threads
# pinned to their cores) for 1 s after each call they get, so polls every 50 ms kept every core busy
# for a whole pull; the kernel thread that ends RCU grace periods then starved (dmesg: "rcu_preempt
# kthread starved") and the pull's NIXL set-up, which waits for one (an fd-table growth in UCX's
# accept), stalled with it. Backed off past 1 s, the workers idle between polls.
PREFETCH_POLL_MAX_S = 1.5


def prefetch_polls(poll_s: float) -> Iterator[float]:
    """The waits between a prefetch's status polls: `poll_s`, doubling up to `PREFETCH_POLL_MAX_S`
    (a longer `poll_s` is kept)."""
    wait = poll_s
    while True:
        yield wait
        wait = max(poll_s, min(2 * wait, PREFETCH_POLL_MAX_S))


def _prefetch(plan: RefitPlan, version: int, clock: Callable[[], float]) -> Generator[Step, Any, Any]:
    # The pull enforces timeout_s itself; the grace lets its own error (which names what was late) win.
    deadline = clock() + plan.timeout_s + plan.grace_s
    statuses = yield from _call("rpc", f"the prefetch of v{version}", op="prefetch", version=version)
    waits = prefetch_polls(plan.poll_s)
    while not prefetch_done(statuses, version):
        if clock() > deadline:
            raise TransferTimeoutError(f"prefetch of v{version} not staged on every rank after {plan.timeout_s}s")
        yield Step(op="sleep", kwargs={"seconds": next(waits)})
        statuses = yield from _call("rpc", f"the prefetch of v{version}", op="status")
    return statuses


def _install_or_repair(plan: RefitPlan, version: int) -> Generator[Step, Any, Any]:
    """Install `version` in the paused engine; if that tore its weights, install the newest READY one.

    Returns (the version installed, repairs made, the ranks' status of a repair's install or None).
    """
    try:
        yield from _swap(version)
        return version, 0, None
    except Exception as exc:  # noqa: BLE001 - raised below unless it tore the weights
        first: Exception = exc
    if not (yield from _torn()):
        raise first
    logger.warning("refit v%d tore the engine's weights (%s); installing the newest version before resuming",
                   version, first)  # fmt: skip
    last: Exception = first
    for attempt in range(1, REPAIR_ATTEMPTS + 1):
        try:
            newest = yield Step(op="resolve", kwargs={
                "catalog": plan.catalog, "name": plan.name, "version": None, "timeout_s": plan.timeout_s,
                "catalog_timeout_s": plan.catalog_timeout_s, **({"token": plan.token} if plan.token else {}),
                **_tls(plan),
            })  # fmt: skip
            yield from _swap(newest)
        except PROGRAMMING_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - the engine is still torn: try again, then report it
            last = exc
            logger.warning("repair %d of the torn engine failed: %s", attempt, exc)
            continue
        statuses = yield from _call("rpc", "the refit backend's status", op="status")
        return newest, attempt, [{"tp_rank": s.get("tp_rank"), **s.get("last", {})} for s in statuses]
    raise TornWeightsError(
        f"the streamed install of v{version} failed part-way ({type(first).__name__}: {first}), leaving the "
        f"engine's weights a mix of versions; {REPAIR_ATTEMPTS} installs of the newest version failed too "
        f"(last: {type(last).__name__}: {last}). The engine is left paused: refit it before resuming"
    ) from first


def _torn() -> Generator[Step, Any, bool]:
    statuses = yield from _call("rpc", "the refit backend's status", op="status")
    return any(s.get("torn") for s in statuses)


def _swap(version: int) -> Generator[Step, Any, None]:
    what = f"the update to v{version}"
    yield from _call("start", what)
    try:
        yield from _call("update", what, version=version)
    except Exception:
        yield from _close_session()
        raise
    yield from _call("finish", what, weight_version=str(version))
    if (yield from _call("reset", f"the prefix-cache reset after {what}")) is False:
        logger.warning("refit v%d: the prefix cache could not be reset (blocks still held)", version)


def _close_session() -> Generator[Step, Any, None]:
    """`close_session` as a step: `finish` without a version, its error (expected on the last rank) ignored."""
    try:
        yield Step(op="finish", kwargs={"weight_version": None})
    except Exception:
        logger.debug("closing the failed update session", exc_info=True)


def _resume(version: int, *, after_error: bool) -> Generator[Step, Any, None]:
    if not after_error:
        yield from _call("resume", f"to resume after the update to v{version}")
        return
    try:
        yield Step(op="resume")
    except Exception:  # the refit's own error is the one to raise
        logger.exception("could not resume the engine after a failed refit to v%d", version)


# -- runners -------------------------------------------------------------------------------------------------


def run(machine: Machine, control: Control, *, sleep: Callable[[float], None] = time.sleep) -> RefitReport:
    """Run the machine's steps with blocking calls on `control` (no event loop needed)."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = machine.send(reply) if error is None else machine.throw(error)
        except StopIteration as done:
            return done.value
        reply, error = None, None
        try:
            if step.op == "sleep":
                sleep(step.kwargs["seconds"])
            elif step.op == "resolve":
                reply = resolve_version(**step.kwargs)
            else:
                reply = getattr(control, step.op)(**step.kwargs)
        except BaseException as exc:  # noqa: BLE001 - thrown into the machine, which handles or re-raises it
            error = exc


async def run_async(machine: Machine, control: AsyncControl) -> RefitReport:
    """Run the machine's steps by awaiting `control`; the catalog lookup runs in a thread."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = machine.send(reply) if error is None else machine.throw(error)
        except StopIteration as done:
            return done.value
        reply, error = None, None
        try:
            if step.op == "sleep":
                await asyncio.sleep(step.kwargs["seconds"])
            elif step.op == "resolve":
                reply = await asyncio.to_thread(resolve_version, **step.kwargs)
            else:
                reply = await getattr(control, step.op)(**step.kwargs)
        except BaseException as exc:  # noqa: BLE001 - cancellation too: the machine resumes the engine first
            error = exc


__all__ = [
    "PROGRAMMING_ERRORS",
    "REPAIR_ATTEMPTS",
    "AsyncControl",
    "Control",
    "RefitPlan",
    "RefitReport",
    "Step",
    "close_session",
    "error_from_status",
    "init_info",
    "prefetch_done",
    "refit_steps",
    "report",
    "resolve_version",
    "run",
    "run_async",
]
