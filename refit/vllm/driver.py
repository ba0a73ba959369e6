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

The sequence and its error paths are `refit.vllm.flow`'s state machine; this module only says how
`LLM` and `AsyncLLM` make each call.
"""

from __future__ import annotations

from typing import Any

from refit.compat import vllm as vllm_compat
from refit.config import DEFAULT_TIMEOUTS
from refit.vllm.flow import (
    RefitPlan,
    RefitReport,
    close_session,
    error_from_status,
    init_info,
    prefetch_done,
    refit_steps,
    report,
    resolve_version,
    run,
    run_async,
)

CONTROL = vllm_compat.WEIGHT_TRANSFER_ATTR  # the worker attribute collective_rpc calls (our backend's __call__)


class LLMControl:
    """The refit calls on a synchronous `vllm.LLM`.

    `LLM` generates only inside its own calls, so nothing runs while a refit does: no pause needed.
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def init(self, info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": info})

    def rpc(self, **kwargs: Any) -> list[dict[str, Any]]:
        return self.llm.collective_rpc(CONTROL, kwargs=kwargs)

    def pause(self) -> None:
        pass

    def start(self) -> None:
        self.llm.start_weight_update()

    def update(self, version: int) -> None:
        self.llm.update_weights({"update_info": {"version": version}})

    def finish(self, weight_version: str | None) -> None:
        self.llm.finish_weight_update(weight_version=weight_version)

    def reset(self) -> bool | None:
        return self.llm.reset_prefix_cache()

    def resume(self) -> None:
        pass


class AsyncLLMControl:
    """The refit calls on a running `AsyncLLM`: requests in flight are frozen (`keep`), not lost."""

    def __init__(self, engine: Any, *, recompute_running: bool = True) -> None:
        self.engine, self.recompute_running = engine, recompute_running

    async def init(self, info: dict[str, Any]) -> None:
        await self.engine.init_weight_transfer_engine(vllm_compat.init_request(info))

    async def rpc(self, **kwargs: Any) -> list[dict[str, Any]]:
        return await self.engine.collective_rpc(CONTROL, kwargs=kwargs)

    async def pause(self) -> None:
        await self.engine.pause_generation(mode="keep")

    async def start(self) -> None:
        await self.engine.start_weight_update()

    async def update(self, version: int) -> None:
        await self.engine.update_weights(vllm_compat.update_request({"version": version}))

    async def finish(self, weight_version: str | None) -> None:
        await self.engine.finish_weight_update(weight_version=weight_version)

    async def reset(self) -> bool | None:
        return await self.engine.reset_prefix_cache(reset_running_requests=self.recompute_running)

    async def resume(self) -> None:
        await self.engine.resume_generation()


def refit_llm(
    llm: Any,
    *,
    catalog: str,
    name: str = "default",
    version: int | None = None,
    replica: int = 0,
    timeout_s: float = DEFAULT_TIMEOUTS.update_s,
    poll_s: float = DEFAULT_TIMEOUTS.poll_s,
    catalog_timeout_s: float = DEFAULT_TIMEOUTS.catalog_s,
    token: str | None = None,
    max_staging_bytes: int | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> RefitReport:
    """Refit a synchronous `vllm.LLM` (created with the refit backend) to `version` (default: newest READY).

    `LLM` generates only inside its own calls, so nothing runs while this one does; the stall is the
    install. `token`: the catalog token (None: `$REFIT_CATALOG_TOKEN` in each process). `tls_ca`,
    `tls_cert`, `tls_key`: PEM files for a catalog served over TLS (as `Receiver`'s), used for the lookup
    here and by every worker.
    `max_staging_bytes`: each worker's staging window (None: 1 GiB; see docs/vllm.md "Memory"). Raises a
    `RefitError`; the engine keeps its previous weights, except after a `TornWeightsError` (a streamed
    install failed part-way and no repair with the newest version succeeded).
    """
    plan = RefitPlan(
        catalog=catalog,
        name=name,
        version=version,
        replica=replica,
        timeout_s=timeout_s,
        poll_s=poll_s,
        catalog_timeout_s=catalog_timeout_s,
        token=token,
        max_staging_bytes=max_staging_bytes,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    return run(refit_steps(plan), LLMControl(llm))


async def refit_async_llm(
    engine: Any,
    *,
    catalog: str,
    name: str = "default",
    version: int | None = None,
    replica: int = 0,
    timeout_s: float = DEFAULT_TIMEOUTS.update_s,
    poll_s: float = DEFAULT_TIMEOUTS.poll_s,
    recompute_running: bool = True,
    catalog_timeout_s: float = DEFAULT_TIMEOUTS.catalog_s,
    token: str | None = None,
    max_staging_bytes: int | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> RefitReport:
    """Refit a running `AsyncLLM` between generation steps; requests in flight are kept, not lost.

    Requests that cross the refit continue on the new weights and report both versions in
    `CompletionOutput.weight_versions`. With `recompute_running` (default) their KV cache is
    recomputed with the new weights when they resume, so after the swap no cached state from the
    old weights is used; with False it is kept (cheaper, staler) and the prefix-cache reset may not
    happen while they hold blocks. `max_staging_bytes`, `token` and `tls_*` as for `refit_llm`. Raises a
    `RefitError`; the engine is resumed in every case but a `TornWeightsError` (its weights are a mix: it
    stays paused).
    The event loop is never blocked: the catalog lookup runs in a thread, every engine call is awaited.
    """
    plan = RefitPlan(
        catalog=catalog,
        name=name,
        version=version,
        replica=replica,
        timeout_s=timeout_s,
        poll_s=poll_s,
        catalog_timeout_s=catalog_timeout_s,
        token=token,
        max_staging_bytes=max_staging_bytes,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    return await run_async(refit_steps(plan), AsyncLLMControl(engine, recompute_running=recompute_running))


__all__ = [
    "CONTROL",
    "AsyncLLMControl",
    "LLMControl",
    "RefitReport",
    "close_session",
    "error_from_status",
    "init_info",
    "prefetch_done",
    "refit_async_llm",
    "refit_llm",
    "report",
    "resolve_version",
]
