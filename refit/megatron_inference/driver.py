"""Refit a running Megatron dynamic inference engine: `MegatronRefitter` on every engine rank.

The engine is megatron-core's `MegatronLLM` or `MegatronAsyncLLM` (0.19) in coordinator mode: its
`DynamicInferenceEngine` steps on a background event loop and takes pause / suspend / resume /
unpause. Each engine rank owns a `MegatronRefitter` (a `Receiver` into the GPTModel the engine runs,
through `refit.engines.MegatronEngine`) and calls `refit()` (or `await refit_async()`) at the same
time as the other ranks. One refit:

1. **prefetch**: the rank pulls the version (default: the newest READY) into its staging buffer
   while the engine keeps generating on the old weights; the ranks agree that every one of them
   holds the same version (a rank that saw an older newest one fetches the newer). A failure here
   raises on every rank before anything paused: the engine never stopped serving.
2. **pause -> suspend**: the engine finishes its step and stops (every rank, Megatron's world
   barrier); suspend frees the KV cache where the KV-cache mode does ("recompute": requests in flight
   are checkpointed, to be prefilled again) and deletes the CUDA graphs where Megatron recaptures them.
   The ranks agree that every one got there (else each undoes what it did and raises).
3. **install**: a copy into the parameters' existing storage (CUDA graphs captured before stay
   valid); the ranks agree that every one installed.
4. **epoch**: the primary rank sends `set_generation_epoch(version)`: Megatron stamps every request
   in flight with a boundary, so each token's version is known (`request_token_versions`).
5. **resume -> unpause**: "recompute" rebuilds the KV cache and resets the block allocator (the prefix
   cache with it), re-adds the checkpointed requests, and recaptures CUDA graphs when it deleted them.

The stall is 2 -> 5. If pause or anything after it fails, resume and unpause are still attempted,
except when the ranks' weights may differ (some installed, some not): `TornWeightsError`, and the
engine stays suspended. Which KV-cache modes are accepted is `versions.cache_policy`'s rule.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from refit.compat import megatron_inference as compat
from refit.config import DEFAULT_TIMEOUTS
from refit.engines.megatron import MegatronEngine
from refit.errors import ConfigError, EngineError, TornWeightsError
from refit.megatron.model import parallel_coords
from refit.megatron_inference.agree import Agreement, RankAgreement
from refit.megatron_inference.versions import CachePolicy, cache_policy
from refit.receiver import Receiver, StagedVersion

logger = logging.getLogger(__name__)

LIFECYCLE_TIMEOUT_S = 600.0  # one pause / suspend / resume / unpause (resume may recapture CUDA graphs)


@dataclass(frozen=True, kw_only=True, slots=True)
class DynamicRefitReport:
    """What one refit of one engine rank did. Times in seconds (this rank's clock)."""

    version: int
    bytes: int  # pulled by this rank
    prefetch_s: float  # fetch into staging, while the engine generated
    stall_s: float  # pause requested -> unpaused: the only time the engine stopped
    pause_s: float  # pause + suspend (Megatron frees the KV cache, drops CUDA graphs in some modes)
    install_s: float  # the copy into the parameters (plus the rest of the pull, when streamed)
    resume_s: float  # epoch + resume + unpause (rebuilds the KV cache, may recapture CUDA graphs)
    seconds: float  # the whole call
    staging_bytes: int
    chunks: int  # 1: the whole version was prefetched; more: chunks past the window were pulled in the stall
    policy: CachePolicy


class _SyncLifecycle:
    """`MegatronLLM`'s blocking calls, each bounded: a call that outlives the timeout raises (its thread is left)."""

    def __init__(self, llm: Any, timeout_s: float) -> None:
        self._llm, self._timeout_s = llm, timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refit-megatron-lifecycle")
        self._stuck: str | None = None  # a call that never returned blocks the pool's one thread

    def __call__(self, name: str) -> None:
        if self._stuck is not None:
            raise EngineError(f"MegatronLLM.{self._stuck}() never returned; the engine cannot be driven any more")
        future = self._pool.submit(getattr(self._llm, name))
        try:
            future.result(timeout=self._timeout_s)
        except FutureTimeout:
            self._stuck = name
            raise EngineError(f"MegatronLLM.{name}() did not return within {self._timeout_s:g}s") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _AsyncLifecycle:
    """`MegatronAsyncLLM`'s coroutines, run on the caller's event loop from the refit's worker thread."""

    def __init__(self, llm: Any, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._llm, self._loop, self._timeout_s = llm, loop, timeout_s

    def __call__(self, name: str) -> None:
        coro = getattr(self._llm, name)()
        compat.require_coroutine(coro, f"MegatronAsyncLLM.{name}()")
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, self._timeout_s), self._loop)
        try:
            future.result(timeout=self._timeout_s + DEFAULT_TIMEOUTS.grace_s)
        except (TimeoutError, FutureTimeout):
            future.cancel()
            raise EngineError(f"MegatronAsyncLLM.{name}() did not return within {self._timeout_s:g}s") from None

    def close(self) -> None:
        pass


class MegatronRefitter:
    """Refits one engine rank of a running `MegatronLLM` / `MegatronAsyncLLM` (coordinator mode).

    Create one on every engine rank (under the engine's `parallel_state`), after the facade. Settings
    the refit cannot serve correctly are refused here, before anything is registered or pulled.

    Args:
        llm: the facade, built with `use_coordinator=True`.
        catalog, name, token: the catalog and the model's name in it (as `Receiver`).
        replica: this engine's index among engine replicas (default: its data-parallel rank).
        architecture, vocab_size: as `MegatronEngine`.
        max_staging_bytes: the staging window; set it to at least the rank's weights for the whole
            pull to happen in the prefetch (a larger version streams its remaining chunks in the stall).
        keep_stale_kv: accept "persist" / "offload" KV-cache modes, where requests in flight keep the
            KV entries of the old weights (`versions.cache_policy`).
        group: the process group of the engine's ranks that agree on each step (None: the default).
        timeout_s: deadline of the prefetch and of an install's pull; lifecycle_timeout_s: of each
            pause / suspend / resume / unpause.
        receiver_options: further `Receiver` arguments (`link_cost`, `verify_digests`, ...).
    """

    def __init__(
        self,
        llm: Any,
        *,
        catalog: str,
        name: str = "default",
        replica: int | None = None,
        architecture: str | None = None,
        vocab_size: int = 0,
        max_staging_bytes: int | None = None,
        keep_stale_kv: bool = False,
        group: Any = None,
        timeout_s: float = DEFAULT_TIMEOUTS.update_s,
        lifecycle_timeout_s: float = LIFECYCLE_TIMEOUT_S,
        token: str | None = None,
        **receiver_options: Any,
    ) -> None:
        if not lifecycle_timeout_s > 0:
            raise ConfigError(f"lifecycle_timeout_s must be > 0, got {lifecycle_timeout_s!r}")
        compat.check_coordinator(llm)
        settings = compat.kv_settings(llm)
        self.policy = cache_policy(
            settings.kv_mode, prefix_caching=settings.prefix_caching,
            static_kv_memory_pointers=settings.static_kv_memory_pointers, keep_stale_kv=keep_stale_kv,
        )  # fmt: skip
        model = compat.gpt_model(llm)
        quantized = compat.quantized_weights(model)
        if quantized is not None:
            raise ConfigError(f"the engine computes from quantized copies of its weights ({quantized}); refit "
                              "installs into the bf16/fp32 parameters only")  # fmt: skip
        self.llm = llm
        self.engine = MegatronEngine(model, architecture=architecture, vocab_size=vocab_size)
        if replica is None:
            replica = parallel_coords()[2].dp_rank
        self._agreement = RankAgreement(group, device=self.engine.device)
        # Direct reads would land in the live weights during the install's pull, inside the stall:
        # staging everything lets the prefetch do the whole pull while the engine generates.
        receiver_options.setdefault("direct", False)
        self.receiver = Receiver(
            catalog=catalog, engine=self.engine, name=name, replica=replica, timeout_s=timeout_s,
            max_staging_bytes=max_staging_bytes, token=token, **receiver_options,
        )  # fmt: skip
        self._timeout_s = timeout_s
        self._lifecycle_timeout_s = lifecycle_timeout_s
        self._sync: _SyncLifecycle | None = None
        self.version: int | None = None  # the version installed by the last refit

    def close(self) -> None:
        """Release the receiver (its staging and NIXL registrations); the engine keeps running."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        self.receiver.close()

    def __enter__(self) -> MegatronRefitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- versions ---------------------------------------------------------------------------------

    def mark_version(self, version: int) -> None:
        """Tell the engine which version it serves (its generation epoch), e.g. the checkpoint it started from.

        Requests added afterwards are stamped with it, so their tokens report a version; a refit does
        this itself. Call it on every rank (only the primary sends). Requests already in flight when the
        engine gets its first epoch are stamped as if all their tokens came from it (Megatron's rule).
        """
        if not isinstance(version, int) or version < 0:
            raise ConfigError(f"version must be a non-negative int, got {version!r}")
        if compat.is_primary(self.llm):
            future = compat.submit_generation_epoch(self.llm, version)
            try:
                future.result(timeout=self._lifecycle_timeout_s)
            except FutureTimeout:
                limit = self._lifecycle_timeout_s
                raise EngineError(f"set_generation_epoch({version}) was not sent within {limit:g}s") from None

    # -- the refit --------------------------------------------------------------------------------

    def refit(self, version: int | None = None) -> DynamicRefitReport:
        """Refit a `MegatronLLM` to `version` (default: the newest READY); call on every engine rank at once."""
        if self._sync is None:
            self._sync = _SyncLifecycle(self.llm, self._lifecycle_timeout_s)
        return self._refit(version, self._sync)

    async def refit_async(self, version: int | None = None) -> DynamicRefitReport:
        """Refit a `MegatronAsyncLLM`; the event loop keeps running (the refit's blocking parts run in a thread)."""
        lifecycle = _AsyncLifecycle(self.llm, asyncio.get_running_loop(), self._lifecycle_timeout_s)
        return await asyncio.to_thread(self._refit, version, lifecycle)

    def _refit(self, version: int | None, lifecycle: Callable[[str], None]) -> DynamicRefitReport:
        if version is not None and (not isinstance(version, int) or version < 0):
            raise ConfigError(f"version must be None or a non-negative int, got {version!r}")
        t0 = time.perf_counter()
        staged = self._prefetch(version)
        t_staged = time.perf_counter()
        times: dict[str, float] = {}
        result = self._swap(staged, lifecycle, times)
        t_end = time.perf_counter()
        self.version = staged.version
        report = DynamicRefitReport(
            version=staged.version,
            bytes=staged.bytes,
            prefetch_s=t_staged - t0,
            stall_s=t_end - times["paused_at"],
            pause_s=times["pause"],
            install_s=times["install"],
            resume_s=times["resume"],
            seconds=t_end - t0,
            staging_bytes=staged.staging_bytes,
            chunks=result.chunks,
            policy=self.policy,
        )
        logger.info(
            "refit v%d: %d bytes, prefetch %.3fs, stall %.3fs (pause %.3fs, install %.3fs, resume %.3fs), %s",
            report.version, report.bytes, report.prefetch_s, report.stall_s, report.pause_s, report.install_s,
            report.resume_s, self.policy.kv_mode,
        )  # fmt: skip
        return report

    def _prefetch(self, version: int | None) -> StagedVersion:
        """Stage the same version on every rank; raises on every rank if any failed (nothing paused yet)."""
        staged, error = self._fetch(version)
        agreed = self._agreement.exchange(failed=error is not None, version=staged.version if staged else -1)
        if not agreed.any_failed and not agreed.same_version:
            # Unpinned, a newer version became READY while the ranks resolved: all take the newest.
            if staged is not None and staged.version != agreed.max_version:
                staged, error = self._fetch(agreed.max_version)
            agreed = self._agreement.exchange(failed=error is not None, version=staged.version if staged else -1)
        _raise_if_failed(agreed, error, "prefetch")
        if not agreed.same_version:
            raise EngineError(f"engine ranks staged different versions ({agreed.min_version}..{agreed.max_version})")
        assert staged is not None
        return staged

    def _fetch(self, version: int | None) -> tuple[StagedVersion | None, BaseException | None]:
        try:
            return self.receiver.fetch(version, timeout_s=self._timeout_s), None
        except Exception as exc:  # noqa: BLE001 - raised after the other ranks heard of it
            return None, exc

    def _swap(self, staged: StagedVersion, lifecycle: Callable[[str], None], times: dict[str, float]) -> Any:
        times["paused_at"] = time.perf_counter()
        done: list[str] = []  # lifecycle steps taken: after an error, only those are undone
        resumable = True
        try:
            error: BaseException | None = None
            try:
                for step in ("pause", "suspend"):
                    lifecycle(step)
                    done.append(step)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it before anyone installs
                error = exc
            _raise_if_failed(self._agreement.exchange(failed=error is not None), error, "pause")
            t_install = time.perf_counter()
            times["pause"] = t_install - times["paused_at"]
            result = None
            try:
                result = self.receiver.install(staged, timeout_s=self._timeout_s)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it before anyone resumes
                error = exc
            times["install"] = time.perf_counter() - t_install
            agreed = self._agreement.exchange(failed=error is not None, version=staged.version)
            if install_outcome(agreed, torn=self.receiver.torn) == "torn":
                resumable = False
                why = f"{type(error).__name__}: {error}" if error else "this rank installed it"
                raise TornWeightsError(
                    f"the install of v{staged.version} left the engine ranks on different or mixed weights "
                    f"({why}); the engine stays suspended: refit it again (that resumes it)"
                ) from error
            _raise_if_failed(agreed, error, "install")
            t_resume = time.perf_counter()
            self.mark_version(staged.version)  # before resume: the engine stamps requests before its next step
            for step in ("resume", "unpause"):
                lifecycle(step)
                done.append(step)
            times["resume"] = time.perf_counter() - t_resume
            return result
        except BaseException:
            if resumable:
                _undo(lifecycle, done, staged.version)
            raise


def _raise_if_failed(agreed: Agreement, error: BaseException | None, step: str) -> None:
    if error is not None:
        raise error
    if agreed.any_failed:
        raise EngineError(f"another engine rank failed the {step}; this rank stopped there too")


def install_outcome(agreed: Agreement, *, torn: bool) -> str:
    """What the ranks' install outcomes leave the engine with.

    "ok": every rank installed; "failed": none did (each refused before writing, so the old weights
    stand everywhere); "torn": some did and some did not, or this rank's streamed install broke off.
    """
    if torn or (agreed.any_failed and not agreed.all_failed):
        return "torn"
    return "failed" if agreed.any_failed else "ok"


def undo_steps(done: list[str]) -> list[str]:
    """The lifecycle calls that bring the engine back to running after a failure, given those taken."""
    return [u for d, u in (("suspend", "resume"), ("pause", "unpause")) if d in done and u not in done]


def _undo(lifecycle: Callable[[str], None], done: list[str], version: int) -> None:
    """After a failed refit: resume if it suspended, unpause if it paused (and did not already)."""
    for name in undo_steps(done):
        try:
            lifecycle(name)
        except Exception:  # the refit's own error is the one raised
            logger.exception("could not %s the engine after a failed refit to v%d", name, version)


__all__ = ["LIFECYCLE_TIMEOUT_S", "DynamicRefitReport", "MegatronRefitter", "install_outcome", "undo_steps"]
