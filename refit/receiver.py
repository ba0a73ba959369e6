"""The engine hook: `Receiver.update_weights()` pulls a version and installs it into an engine.

A refit is two steps, usable separately: `fetch` resolves the version, plans the byte ranges this
engine rank needs and pulls what fits the staging window; `install` puts it into the engine. Three
ways to install, chosen per refit (docs/hooks.md has the contract of each):

* **Whole**: everything into staging, re-checked READY, verified against the trainers' digests, then
  installed as one set the engine validates first: the old version or the new one, never a mix.
* **Streamed** (engines with `destinations()`: HF, Megatron): contiguous runs are READ straight into
  engine memory, the rest streams through a window of `max_staging_bytes` (1 GiB by default) in
  chunks. Engine memory changes during the refit, so it must not serve meanwhile; if the READY
  re-check, a digest or a read fails, `Receiver.torn` says the weights are mixed until a refit
  completes, and an unpinned `update_weights()` pulls the newest version again.
* **Layer by layer** (engines with `layer_of()` and `install_layers()`: vLLM): chunks of whole layers
  (`refit.plan.layered`), chunk k installed while chunk k + 1 is pulled; same re-check and `torn`.

Failover: a rank the catalog lists as dead, or whose read fails or times out (`source_timeout_s`), is
not read from again in this call; the version is planned again from DP/EDP replicas and pulled within
the same deadline, or `SourceDeadError` names the rank. A read that fails may leave transfers running
into staging, so those buffers are set aside (`Receiver.stats`).

The `Receiver` owns the hook's API, its retries and failover; each attempt at a fetch or an install is
`refit.puller`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from refit import ahead
from refit.catalog.client import CatalogClient
from refit.config import DEFAULT_TIMEOUTS, MIN_WAIT_S
from refit.engines.base import Engine, destinations_of, installs_layers
from refit.errors import ConfigError, DigestError, TransportError, VersionRetiredError
from refit.plan.cost import DEFAULT_COST, LinkCost
from refit.plan.liveness import DeadSources
from refit.plan.planner import MAX_OVERREAD, Plan, stripe
from refit.plan_cache import PlanCache
from refit.puller import Puller
from refit.staged import ReceiverStats, StagedVersion
from refit.types import UpdateResult
from refit.versions import CatalogVersions

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_WINDOW = 1 << 30  # staging bytes per engine rank, for engines that take streamed installs
# A run smaller than this goes through staging instead of a direct read: a direct read is a
# descriptor of its own while staged neighbours merge into few, so it pays only where copying the run
# out of staging costs more than a descriptor. Measured per descriptor: ~0.4 us between CPU processes
# (copy ~10 GB/s, so ~4 KB breaks even) and ~12 us for cuda_ipc on H100/H200 (copy ~1 TB/s: ~12 MB).
# At 1 MiB on two H200s a refit of Llama-3-8B (its QKV runs read directly) ran ~10 % slower; on one
# H200 llama-8gb's QKV read per query group (483 descriptors, not 99) took 7.8 ms against 6.0-6.3 staged.
# Trainer ranks on the engine's host that this process copies from itself over CUDA IPC cost no
# descriptor: a plan of only such ranks reads every piece that is one run of one engine tensor
# directly, whatever its size ("cuda_ipc"). A piece cut into many runs (QKV into HF q, k and v per
# query group) is still staged below the "cuda" size: llama-8gb's QKV read per group over CUDA IPC
# took one H200's refit from 5.4 ms (staged) to 6.8 ms as 483 copies, and to 5.7-5.9 ms with each
# tensor's runs folded into one strided copy (and its partial digest blocks went unchecked).
DIRECT_MIN_BYTES = {"cpu": 64 << 10, "cuda": 16 << 20, "cuda_ipc": 0}


class Receiver:
    """Pulls weight versions from a refit catalog into one engine rank.

    Args:
        catalog: the catalog's "host:port".
        engine: an `Engine` (e.g. `HFEngine(model)`).
        name: the model's name in the catalog.
        replica: this engine's index among engine replicas; spreads reads over trainer replicas.
        timeout_s: default deadline of a whole update (waiting for READY plus the pull).
        catalog_timeout_s: deadline of each catalog call.
        token: a catalog token (the reader token suffices; None: `$REFIT_CATALOG_TOKEN`, else none).
        tls_ca, tls_cert, tls_key: PEM files for a catalog served over TLS: the CA that signed its
            certificate, and this client's certificate and key where the catalog requires mutual TLS
            (as `CatalogClient`).
        max_staging_bytes: the staging window: at most this many staging bytes at once on this rank.
            An engine with `destinations()` streams a larger refit through it (default 1 GiB), one
            with `install_layers()` streams it in chunks of whole layers (default 1 GiB; a layer
            over half the window is refused before any pull); any other installs whole, so a refit
            whose staging exceeds it is refused before anything is allocated or pulled (default: no limit).
        direct: read tensors that are one contiguous run of a trainer rank's bytes straight into
            the engine's memory (engines with `destinations()`), skipping staging and its copy.
        direct_min_bytes: smaller runs are staged even where they could be read directly (default:
            `DIRECT_MIN_BYTES` for the engine's device type: 64 KiB on CPU, 16 MiB on CUDA, where all
            the trainer ranks are copied from over CUDA IPC any piece that is one run of one tensor).
        link_cost: the link the planner prices reads with (`refit.plan.cost`: `IB_RAIL` by default,
            `NVLINK` or `GPU_LOCAL` within a host, `CPU_UCX` between CPU processes): it decides when
            a hole is read along and when a strided slice is read as its enclosing block.
        max_overread: the most unneeded bytes enclosing blocks may add, as a share of needed bytes.
        on_after_wire: called with the version number after its last byte is pulled and before the
            receiver re-checks that the version is still READY (to instrument, or to race a trainer
            step in tests); an exception it raises fails the refit.
        source_timeout_s: the most one pull attempt waits for its reads; a source that has not
            answered by then is taken for dead and its reads fail over to a replica (None: the
            update's whole deadline, which leaves no time to fail over from a stalled source).
        verify_digests: check every pulled block against the digest its trainer rank published
            (`refit.digest`) before it is installed; a mismatch raises DigestError naming the tensor
            and the trainer rank (docs/reliability.md, "Digests"). False skips the check.
        cuda_ipc: an engine on a GPU copies the bytes of trainer ranks on its own host itself, out of
            the GPU memory they publish CUDA IPC handles of (`Publisher(cuda_ipc=True)`), instead of
            reading them over NIXL (`refit.transport.cuda_ipc`), and their version words from a
            page they share on the host. A rank whose memory cannot be mapped is read over NIXL.
        mapped_install: with `cuda_ipc` and `destinations()`, the pieces a refit would stage (QKV to
            un-interleave, a row-parallel half) from trainer ranks on the engine's own GPU are copied
            by kernels straight out of their mapped memory instead (digests checked there): no
            staging, each byte crossing the GPU's memory once; with digests on, the direct reads from
            there are copied and digested in one pass too (see the property; docs/hooks.md).
    """

    def __init__(
        self,
        *,
        catalog: str,
        engine: Engine,
        name: str = "default",
        replica: int = 0,
        timeout_s: float = DEFAULT_TIMEOUTS.update_s,
        catalog_timeout_s: float = DEFAULT_TIMEOUTS.catalog_s,
        max_staging_bytes: int | None = None,
        direct: bool = True,
        direct_min_bytes: int | None = None,
        link_cost: LinkCost = DEFAULT_COST,
        max_overread: float = MAX_OVERREAD,
        on_after_wire: Callable[[int], None] | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        verify_digests: bool = True,
        source_timeout_s: float | None = None,
        cuda_ipc: bool = True,
        mapped_install: bool = True,
    ) -> None:
        if not isinstance(engine, Engine):
            raise ConfigError(f"engine must implement refit.engines.Engine, got {type(engine).__name__}")
        if replica < 0 or timeout_s <= 0 or (max_staging_bytes is not None and max_staging_bytes <= 0):
            raise ConfigError("replica must be >= 0, timeout_s > 0 and max_staging_bytes positive")
        if source_timeout_s is not None and not source_timeout_s > 0:
            raise ConfigError(f"source_timeout_s must be > 0 (or None), got {source_timeout_s!r}")
        if on_after_wire is not None and not callable(on_after_wire):
            raise ConfigError(f"on_after_wire must be callable, got {type(on_after_wire).__name__}")
        direct_min_local = DIRECT_MIN_BYTES["cuda_ipc"] if direct_min_bytes is None else None
        if direct_min_bytes is None:
            direct_min_bytes = DIRECT_MIN_BYTES.get(torch.device(engine.device).type, DIRECT_MIN_BYTES["cuda"])
        if max_overread < 0 or direct_min_bytes < 0:
            raise ConfigError(f"max_overread ({max_overread}) and direct_min_bytes ({direct_min_bytes}) must be >= 0")
        self.engine = engine
        self.name = name
        self._spec = engine.spec()
        self._stripe = stripe(replica=replica, tp_rank=self._spec.tp_rank, tp_size=self._spec.tp_size)
        self._timeout_s = timeout_s
        self._client = CatalogClient(
            catalog, timeout_s=catalog_timeout_s, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        self._versions = CatalogVersions(self._client, name, on_after_wire=on_after_wire)
        dests = destinations_of(engine)
        layered = dests is None and installs_layers(engine)
        bounded = dests is not None or layered
        self._window = max_staging_bytes if max_staging_bytes is not None or not bounded else DEFAULT_WINDOW
        direct = direct and dests is not None
        plans = PlanCache(
            name=name, engine=engine, spec=self._spec, stripe=self._stripe, link_cost=link_cost,
            max_overread=max_overread, window=self._window, dests=dests, direct=direct,
            direct_min_bytes=direct_min_bytes, layered=layered, direct_min_local=direct_min_local,
        )  # fmt: skip
        self._pull = Puller(
            engine=engine, name=name, spec=self._spec, client=self._client, versions=self._versions, plans=plans,
            dests=dests, layered=layered, max_staging_bytes=max_staging_bytes, source_timeout_s=source_timeout_s,
            verify=bool(verify_digests), cuda_ipc=bool(cuda_ipc),
        )  # fmt: skip
        self.mapped_install = bool(mapped_install)
        self.failed_over: tuple[str, ...] = ()  # agents the last fetch or update failed over from

    # -- introspection ----------------------------------------------------------------------------

    @property
    def plan(self) -> Plan | None:
        """The plan of the last fetch that got as far as planning (None before)."""
        return self._pull.plans.plan

    @property
    def torn(self) -> bool:
        """Whether the engine's weights are a mix of versions: a streamed refit wrote part of them and
        then failed. The engine must not serve until a refit completes (which clears this)."""
        return self._pull.torn

    @property
    def verify_digests(self) -> bool:
        """Whether fetches check pulled bytes against their digests (`verify_digests=`); settable, and
        read at each fetch (refit-bench turns it off and on between refits to price the check)."""
        return self._pull.verify

    @verify_digests.setter
    def verify_digests(self, on: bool) -> None:
        self._pull.verify = _flag("verify_digests", on)

    @property
    def cuda_ipc(self) -> bool:
        """Whether trainer ranks on this host are copied from over CUDA IPC (`cuda_ipc=`); settable,
        read at each fetch (a change re-plans: the plans of local ranks read more directly)."""
        return self._pull.cuda_ipc

    @cuda_ipc.setter
    def cuda_ipc(self, on: bool) -> None:
        self._pull.cuda_ipc = _flag("cuda_ipc", on)

    @property
    def mapped_install(self) -> bool:
        """Whether a streamed refit copies the pieces it would stage (QKV to un-interleave, say) straight
        out of the memory of trainer ranks on the engine's GPU, mapped over CUDA IPC, instead of pulling
        them through staging first (default True; settable, read at each fetch). Into `destinations()`
        only; the digest check reads those pieces where the copies read them. Such a refit holds no
        staging. With digests on, its direct reads from there are also copied by kernels that digest
        them as they copy (`ReceiverStats.checked_copies`)."""
        return self._pull.mapped_install

    @mapped_install.setter
    def mapped_install(self, on: bool) -> None:
        self._pull.mapped_install = _flag("mapped_install", on)

    @property
    def window(self) -> int | None:
        """The staging window (None: an engine that installs only whole sets, without a limit)."""
        return self._window

    @property
    def stats(self) -> ReceiverStats:
        return self._pull.stats()

    def _fail_over(self, exc: TransportError, dead: DeadSources, deadline: float) -> bool:
        """Whether a failed pull is worth another attempt without the source that failed it."""
        rank = dead.give_up(exc, self._pull.agents) if time.monotonic() <= deadline else None
        if rank is None:
            return False
        self.failed_over = dead.agents
        logger.warning("%s: trainer rank %d (agent %s) failed (%s); failing over", self.name, rank, exc.agent_name, exc)
        return True

    # -- the hook ------------------------------------------------------------------------------------

    def fetch(self, version: int | None = None, *, timeout_s: float | None = None) -> StagedVersion:
        """Pull `version` (default: the newest READY one) into staging; the engine is never touched.

        A version installed whole is pulled completely and validated. A streamed one is planned and
        its first chunks (what fits the window) are pulled; `install` pulls the rest. `timeout_s`
        (default: the receiver's) bounds the fetch. Raises VersionNotFoundError, VersionNotReadyError
        (naming missing ranks), VersionRetiredError, ModelMismatchError, CatalogUnavailableError or
        TransportError.
        """
        deadline = time.monotonic() + self._timeout(timeout_s)

        def attempt(dead: DeadSources) -> StagedVersion:
            return self._pull.fetch(version, deadline, prefetch=True, dead=dead)

        return self._retrying(version, deadline, attempt)

    def _retrying(self, version: int | None, deadline: float, attempt: Callable[[DeadSources], _T]) -> _T:
        """`attempt` again after a retired version (unpinned: the newest is what we want anyway) or a
        failed source (failover), until it succeeds or the deadline passes."""
        dead = DeadSources()
        self.failed_over = ()
        while True:
            try:
                return attempt(dead)
            except VersionRetiredError:
                if version is not None or time.monotonic() > deadline:
                    raise
                logger.info("%s: version retired during the pull; retrying with the newest", self.name)
            except TransportError as exc:
                # A streamed install that failed stays torn until a retry completes it.
                if not self._fail_over(exc, dead, deadline):
                    raise
            except DigestError as exc:
                self._versions.retry_digest(exc, version, deadline)
            except ahead.AheadMissed as exc:  # pulled again through the catalog, pinned or not
                self._pull.ahead.missed += 1
                logger.info("%s: %s; pulling again through the catalog", self.name, exc)

    def _timeout(self, timeout_s: float | None) -> float:
        if timeout_s is None:
            return self._timeout_s
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 (or None for the receiver's default), got {timeout_s!r}")
        return timeout_s

    def install(self, staged: StagedVersion, *, timeout_s: float | None = None) -> UpdateResult:
        """Install a staged version into the engine.

        Whole: the engine validates, then writes everything. Streamed: the rest of the version is
        pulled now (`timeout_s` bounds that, default: the receiver's), straight into the engine and
        through the staging window; on failure `torn` is set and the error says the weights are mixed.
        """
        if staged.generation != self._pull.generation:
            raise ConfigError("this staged version was overwritten by a later fetch; fetch again")
        return self._pull.install(staged, time.monotonic() + self._timeout(timeout_s))

    def update_weights(self, version: int | None = None, *, timeout_s: float | None = None) -> UpdateResult:
        """Fetch `version` (default: newest READY) and install it.

        On error an engine installed whole keeps its old weights. A streamed refit whose pull raced a
        trainer step is pulled again from the newest version when unpinned; otherwise the error
        says the engine's weights are mixed (`torn`). A source that fails mid-pull is failed over
        to a replica (module docstring); SourceDeadError when there is none.
        """
        deadline = time.monotonic() + self._timeout(timeout_s)
        first = True

        def attempt(dead: DeadSources) -> UpdateResult:
            nonlocal first
            # Ahead of the catalog's answer where the trainers' version words allow it, on the first
            # attempt only; no prefetch: the whole pull is pipelined in install, direct reads beside the chunks.
            staged = self._pull.fetch_ahead(version, deadline) if first else None
            first = False
            if staged is None:
                staged = self._pull.fetch(version, deadline, prefetch=False, dead=dead)
            return self.install(staged, timeout_s=max(deadline - time.monotonic(), MIN_WAIT_S))

        return self._retrying(version, deadline, attempt)

    # -- life cycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        self._pull.close()
        self._client.close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flag(name: str, on: object) -> bool:
    """`on`, a switch set on a live receiver; a ConfigError naming `name` if it is not a bool."""
    if not isinstance(on, bool):
        raise ConfigError(f"{name} must be a bool, got {on!r}")
    return on


__all__ = ["DEFAULT_WINDOW", "DIRECT_MIN_BYTES", "Receiver", "ReceiverStats", "StagedVersion"]
