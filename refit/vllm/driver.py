"""One call that refits a running vLLM engine: `refit_llm(LLM)` and `await refit_async_llm(AsyncLLM)`.

The sequence (the engine must have been created with `weight_transfer_config={"backend": "refit"}`):

1. resolve the version in the catalog (newest READY, or the pinned one once READY), so every TP
   rank installs the same one;
2. `init_weight_transfer_engine` (idempotent), then **prefetch**: every worker pulls the version into
   its staging buffer on a background thread while the engine keeps generating on the old weights;
   wait until every rank has it staged. A pull that fails or times out raises here, before anything
   paused: the engine never stopped serving the old weights. So does an engine whose model differs
   from the catalog's (the plan is checked first);
3. **swap**: `pause_generation(mode="keep")`, `start_weight_update`, `update_weights({"version": v})`,
   `finish_weight_update(weight_version=str(v))`, `reset_prefix_cache`, then `resume_generation`
   (always, also on error). The stall is pause -> resume; the wire time is the prefetch's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from refit import errors
from refit.catalog.client import CatalogClient
from refit.errors import ConfigError, EngineError, RefitError, TransferTimeoutError, VersionNotFoundError
from refit.types import VersionState

logger = logging.getLogger(__name__)

CONTROL = "weight_transfer_engine"  # the worker attribute collective_rpc calls (our backend's __call__)


@dataclass(frozen=True, kw_only=True, slots=True)
class RefitReport:
    """What one refit of one engine did. Times in seconds, measured by the caller's clock except `wire_s`."""

    version: int
    bytes: int  # pulled by all ranks together
    bytes_per_rank: tuple[int, ...]
    wire_s: float  # the slowest rank's NIXL transfer
    prefetch_s: float  # prefetch requested -> every rank staged (the engine kept generating)
    stall_s: float  # pause -> resume: the only time generation stopped
    install_s: float  # the slowest rank's install (layerwise reload)
    seconds: float  # the whole call


def init_info(*, catalog: str, name: str = "default", replica: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
    """The refit backend's `init_info` for `init_weight_transfer_engine`."""
    if not catalog or replica < 0 or timeout_s <= 0:
        raise ConfigError("catalog must be set, replica >= 0 and timeout_s > 0")
    return {"catalog": catalog, "name": name, "replica": replica, "timeout_s": timeout_s}


def resolve_version(*, catalog: str, name: str, version: int | None, timeout_s: float) -> int:
    """The version to install: `version` once it is READY, or the newest READY one."""
    with CatalogClient(catalog) as client:
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
    *, version: int, staged: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], times: dict[str, float]
) -> RefitReport:
    per_rank = tuple(int(s.get("bytes", 0)) for s in sorted(staged, key=lambda s: s["tp_rank"]))
    return RefitReport(
        version=version,
        bytes=sum(per_rank),
        bytes_per_rank=per_rank,
        wire_s=max(float(s.get("wire_s", 0.0)) for s in staged),
        prefetch_s=times["prefetch"],
        stall_s=times["stall"],
        install_s=max(float(s.get("last", {}).get("install_s", 0.0)) for s in after),
        seconds=times["total"],
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


def _prefetch(control: Callable[..., list[dict[str, Any]]], version: int, timeout_s: float, poll_s: float) -> list:
    deadline = time.monotonic() + timeout_s + 5.0
    statuses = control(op="prefetch", version=version)
    while not prefetch_done(statuses, version):
        if time.monotonic() > deadline:
            raise TransferTimeoutError(f"prefetch of v{version} not staged on every rank after {timeout_s}s")
        time.sleep(poll_s)
        statuses = control(op="status")
    return statuses


def refit_llm(
    llm: Any,
    *,
    catalog: str,
    name: str = "default",
    version: int | None = None,
    replica: int = 0,
    timeout_s: float = 120.0,
    poll_s: float = 0.02,
) -> RefitReport:
    """Refit a synchronous `vllm.LLM` (created with the refit backend) to `version` (default: newest READY).

    `LLM` generates only inside its own calls, so nothing runs while this one does; the stall is the
    install. Raises a `RefitError`; the engine keeps its previous weights in every case.
    """
    t0 = time.perf_counter()
    v = resolve_version(catalog=catalog, name=name, version=version, timeout_s=timeout_s)
    llm.init_weight_transfer_engine(
        {"init_info": init_info(catalog=catalog, name=name, replica=replica, timeout_s=timeout_s)}
    )
    staged = _prefetch(lambda **kw: llm.collective_rpc(CONTROL, kwargs=kw), v, timeout_s, poll_s)
    t_pause = time.perf_counter()
    llm.start_weight_update()
    try:
        llm.update_weights({"update_info": {"version": v}})
    except Exception as exc:
        close_session(llm.finish_weight_update)
        raise EngineError(f"vLLM refused the update to v{v}: {exc}") from exc
    llm.finish_weight_update(weight_version=str(v))
    llm.reset_prefix_cache()
    t_resume = time.perf_counter()
    after = llm.collective_rpc(CONTROL, kwargs={"op": "status"})
    times = {"prefetch": t_pause - t0, "stall": t_resume - t_pause, "total": time.perf_counter() - t0}
    out = report(version=v, staged=staged, after=after, times=times)
    logger.info(
        "refit v%d: %d bytes (%s per rank), wire %.3fs, stall %.3fs",
        v,
        out.bytes,
        out.bytes_per_rank,
        out.wire_s,
        out.stall_s,
    )
    return out


async def refit_async_llm(
    engine: Any,
    *,
    catalog: str,
    name: str = "default",
    version: int | None = None,
    replica: int = 0,
    timeout_s: float = 120.0,
    poll_s: float = 0.02,
    recompute_running: bool = True,
) -> RefitReport:
    """Refit a running `AsyncLLM` between generation steps; requests in flight are kept, not lost.

    Requests that cross the refit continue on the new weights and report both versions in
    `CompletionOutput.weight_versions`. With `recompute_running` (default) their KV cache is
    recomputed with the new weights when they resume, so after the swap no cached state from the
    old weights is used; with False it is kept (cheaper, staler) and the prefix-cache reset may not
    happen while they hold blocks. Raises a `RefitError`; the engine is resumed in every case.
    """
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest

    t0 = time.perf_counter()
    v = await asyncio.to_thread(resolve_version, catalog=catalog, name=name, version=version, timeout_s=timeout_s)
    info = init_info(catalog=catalog, name=name, replica=replica, timeout_s=timeout_s)
    await engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=info))
    deadline = time.monotonic() + timeout_s + 5.0
    staged = await engine.collective_rpc(CONTROL, kwargs={"op": "prefetch", "version": v})
    while not prefetch_done(staged, v):
        if time.monotonic() > deadline:
            raise TransferTimeoutError(f"prefetch of v{v} not staged on every rank after {timeout_s}s")
        await asyncio.sleep(poll_s)
        staged = await engine.collective_rpc(CONTROL, kwargs={"op": "status"})
    t_pause = time.perf_counter()
    await engine.pause_generation(mode="keep")
    try:
        await engine.start_weight_update()
        try:
            await engine.update_weights(WeightTransferUpdateRequest(update_info={"version": v}))
        except Exception as exc:
            try:
                await engine.finish_weight_update()
            except Exception:
                logger.debug("closing the failed update session", exc_info=True)
            raise EngineError(f"vLLM refused the update to v{v}: {exc}") from exc
        await engine.finish_weight_update(weight_version=str(v))
        if not await engine.reset_prefix_cache(reset_running_requests=recompute_running):
            logger.warning("refit v%d: the prefix cache could not be reset (blocks still held)", v)
    except RefitError:
        raise
    except Exception as exc:
        raise EngineError(f"vLLM refused the update to v{v}: {exc}") from exc
    finally:
        await engine.resume_generation()
        t_resume = time.perf_counter()
    after = await engine.collective_rpc(CONTROL, kwargs={"op": "status"})
    times = {"prefetch": t_pause - t0, "stall": t_resume - t_pause, "total": time.perf_counter() - t0}
    out = report(version=v, staged=staged, after=after, times=times)
    logger.info(
        "refit v%d: %d bytes (%s per rank), wire %.3fs, stall %.3fs",
        v,
        out.bytes,
        out.bytes_per_rank,
        out.wire_s,
        out.stall_s,
    )
    return out
