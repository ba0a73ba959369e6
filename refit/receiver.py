"""The engine hook: `Receiver.update_weights()` pulls a version and installs it into an engine.

A refit is two steps, usable separately: `fetch` resolves the version, plans the byte ranges this
engine rank needs, pulls them with one batched NIXL READ per trainer rank into a registered
staging buffer, re-checks that the version is still READY (so bytes a trainer overwrote mid-pull
are never used) and assembles the engine's tensors; `install` hands them to the engine. Nothing
touches the engine before everything is staged and validated. A pull that fails or times out may
leave transfers running into staging, so that buffer is set aside and the next pull gets a fresh
one (`Receiver.stats` shows both).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from refit.catalog.client import CatalogClient
from refit.config import DEFAULT_TIMEOUTS
from refit.dtypes import device_of
from refit.engines.base import Engine, TensorSpec, check_compatible, check_tensors
from refit.errors import ConfigError, VersionNotFoundError, VersionRetiredError
from refit.plan.assemble import assemble
from refit.plan.cost import DEFAULT_COST, LinkCost
from refit.plan.planner import MAX_OVERREAD, Plan, plan_refit, stripe
from refit.transport.jobs import jobs_for
from refit.transport.nixl import NixlAgent
from refit.types import SourceRecord, UpdateResult, VersionInfo, VersionState

logger = logging.getLogger(__name__)

_MIN_WAIT_S = 0.001  # a wait whose deadline has passed still gets this long, so it fails by its own error

# Staging buffers a closed receiver could not free: a failed read may still write into them.
_PARKED: list[torch.Tensor] = []


@dataclass(kw_only=True)
class StagedVersion:
    """A version pulled and validated, ready to install (valid until the next fetch)."""

    version: int
    tensors: dict[str, torch.Tensor]
    bytes: int
    num_sources: int
    num_descriptors: int
    staging_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    generation: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiverStats:
    """A receiver's staging, at one moment.

    Attributes:
        registrations: staging buffers registered with NIXL so far (1 while one buffer is reused).
        staging_bytes: size of the current staging buffer (0: none allocated, or set aside).
        quarantined: staging buffers set aside after a failed or timed-out read, so far; the next
            fetch pulls into a fresh buffer.
        quarantined_bytes: bytes of those still held because a read into them may still be running.
    """

    registrations: int
    staging_bytes: int
    quarantined: int
    quarantined_bytes: int


class Receiver:
    """Pulls weight versions from a refit catalog into one engine rank.

    Args:
        catalog: the catalog's "host:port".
        engine: an `Engine` (e.g. `HFEngine(model)`).
        name: the model's name in the catalog.
        replica: this engine's index among engine replicas; spreads reads over trainer replicas.
        timeout_s: default deadline of a whole update (waiting for READY plus the pull).
        catalog_timeout_s: deadline of each catalog call.
        max_staging_bytes: refuse (before allocating or pulling anything) a refit whose staging
            buffer would exceed this; staging holds one version of this rank's tensors.
        link_cost: the link the planner prices reads with (`refit.plan.cost`: `IB_RAIL` by default,
            `NVLINK` or `GPU_LOCAL` within a host, `CPU_UCX` between CPU processes): it decides when
            a hole is read along and when a strided slice is read as its enclosing block.
        max_overread: the most unneeded bytes enclosing blocks may add, as a share of needed bytes.
        on_after_wire: called with the version number after its bytes are pulled and before the
            receiver re-checks that the version is still READY (to instrument, or to race a trainer
            step in tests); an exception it raises fails the fetch.
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
        link_cost: LinkCost = DEFAULT_COST,
        max_overread: float = MAX_OVERREAD,
        on_after_wire: Callable[[int], None] | None = None,
    ) -> None:
        if not isinstance(engine, Engine):
            raise ConfigError(f"engine must implement refit.engines.Engine, got {type(engine).__name__}")
        if replica < 0 or timeout_s <= 0 or (max_staging_bytes is not None and max_staging_bytes <= 0):
            raise ConfigError("replica must be >= 0, timeout_s > 0 and max_staging_bytes positive")
        if on_after_wire is not None and not callable(on_after_wire):
            raise ConfigError(f"on_after_wire must be callable, got {type(on_after_wire).__name__}")
        self._max_staging = max_staging_bytes
        if max_overread < 0:
            raise ConfigError(f"max_overread must be >= 0, got {max_overread}")
        self._link_cost, self._max_overread = link_cost, max_overread
        self.engine = engine
        self.name = name
        self._spec = engine.spec()
        self._layout = self._spec.layout()
        self._stripe = stripe(replica=replica, tp_rank=self._spec.tp_rank, tp_size=self._spec.tp_size)
        self._timeout_s = timeout_s
        self._on_after_wire = on_after_wire
        self._client = CatalogClient(catalog, timeout_s=catalog_timeout_s)
        self._agent: NixlAgent | None = None
        self._staging: torch.Tensor | None = None
        self._quarantine: list[torch.Tensor] = []
        self._registrations = 0
        self._quarantined = 0
        self._plan_key: tuple | None = None
        self._plan: Plan | None = None
        self._generation = 0

    # -- introspection ----------------------------------------------------------------------------

    @property
    def plan(self) -> Plan | None:
        """The plan of the last fetch that got as far as planning (None before)."""
        return self._plan

    @property
    def stats(self) -> ReceiverStats:
        return ReceiverStats(
            registrations=self._registrations,
            staging_bytes=0 if self._staging is None else self._staging.numel(),
            quarantined=self._quarantined,
            quarantined_bytes=sum(t.numel() for t in self._quarantine),
        )

    # -- version resolution -----------------------------------------------------------------------

    def _resolve(self, version: int | None, deadline: float) -> VersionInfo:
        if version is not None:
            remaining = max(deadline - time.monotonic(), _MIN_WAIT_S)
            return self._client.wait_ready(name=self.name, version=version, timeout_s=remaining)
        while True:
            info = self._client.latest(name=self.name, state=VersionState.READY)
            if info is not None:
                return info
            if time.monotonic() > deadline:
                raise VersionNotFoundError(f"no READY version of {self.name!r} in the catalog")
            time.sleep(DEFAULT_TIMEOUTS.poll_s)

    # -- planning and staging -----------------------------------------------------------------------

    def _plan_for(self, info: VersionInfo, sources: list[SourceRecord]) -> Plan:
        key = (info.model, tuple((s.rank, s.agent_name, s.regions, s.tensors) for s in sources))
        if key == self._plan_key and self._plan is not None:
            return self._plan
        check_compatible(self._spec, info.model)
        plan = plan_refit(model=info.model, sources=sources, layout=self._layout, stripe=self._stripe,
                          cost=self._link_cost, max_overread=self._max_overread)  # fmt: skip
        planned = {t.hf_name: TensorSpec(shape=t.shape, dtype=t.dtype) for t in plan.targets}
        check_tensors(self.engine.expected(), planned)
        self._plan_key, self._plan = key, plan
        return plan

    def _ensure_staging(self, nbytes: int) -> torch.Tensor:
        """One registered staging buffer, grown when needed, reused by every later refit."""
        if self._agent is None:
            self._agent = NixlAgent(prefix=f"refit-engine-{self.name}-tp{self._spec.tp_rank}")
        self._release_quarantine()
        device = self.engine.device
        if self._staging is None or self._staging.numel() < nbytes or self._staging.device != device:
            if self._staging is not None:
                self._deregister(self._staging)
                self._staging = None
            staging = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            where, where_id = device_of(staging)
            self._agent.register(staging.data_ptr(), staging.numel(), device=where, device_id=where_id)
            self._staging = staging
            self._registrations += 1
        return self._staging

    def _quarantine_staging(self) -> None:
        """Set staging aside after a failed read: a transfer NIXL could not stop may still write into it.

        The next fetch pulls into a fresh buffer. The old one stays allocated and registered until
        every transfer of the failed read has ended (freed earlier, its memory could become the new
        staging buffer, or anything else, and take the late bytes), then it is deregistered and freed.
        """
        staging, self._staging = self._staging, None
        if staging is None:
            return
        self._quarantine.append(staging)
        self._quarantined += 1
        logger.warning("%s: a read failed; its staging buffer (%d bytes) is set aside", self.name, staging.numel())
        self._release_quarantine()

    def _release_quarantine(self) -> None:
        """Free the set-aside buffers once no transfer of a failed read is still running."""
        if not self._quarantine or self._agent is None or self._agent.in_flight():
            return
        for staging in self._quarantine:
            self._deregister(staging)
        self._quarantine.clear()

    def _deregister(self, staging: torch.Tensor) -> None:
        assert self._agent is not None
        where, where_id = device_of(staging)
        try:
            self._agent.deregister(staging.data_ptr(), staging.numel(), device=where, device_id=where_id)
        except Exception:  # the buffer is dropped either way; NIXL frees its registration with the agent
            logger.warning("%s: deregistering a staging buffer failed", self.name, exc_info=True)

    # -- the hook ------------------------------------------------------------------------------------

    def fetch(self, version: int | None = None, *, timeout_s: float | None = None) -> StagedVersion:
        """Pull `version` (default: the newest READY one) into staging and validate it.

        `timeout_s` (default: the receiver's) bounds the whole fetch. Raises VersionNotFoundError,
        VersionNotReadyError (naming missing ranks), VersionRetiredError, ModelMismatchError,
        CatalogUnavailableError or TransportError; the engine is never touched.
        """
        if timeout_s is None:
            timeout_s = self._timeout_s
        elif not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 (or None for the receiver's default), got {timeout_s!r}")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._fetch_once(version, deadline)
            except VersionRetiredError:
                # The trainer moved on while we pulled: the newest version is what we want anyway.
                if version is not None or time.monotonic() > deadline:
                    raise
                logger.info("%s: version retired during the pull; retrying with the newest", self.name)

    def _fetch_once(self, version: int | None, deadline: float) -> StagedVersion:
        t0 = time.perf_counter()
        # 1. Resolve the version, plan this rank's reads (cached while the sources stay the same) and
        #    refuse, before allocating anything, a plan over the staging limit.
        info = self._resolve(version, deadline)
        sources = self._client.get_sources(name=self.name, version=info.version)
        plan = self._plan_for(info, sources)
        if self._max_staging is not None and plan.staging_bytes > self._max_staging:
            raise ConfigError(
                f"version {info.version} needs {plan.staging_bytes} bytes of staging on this rank, "
                f"over max_staging_bytes={self._max_staging}"
            )
        t_plan = time.perf_counter()
        # 2. Staging and one READ job per trainer rank (and remote memory kind); connect to each.
        staging = self._ensure_staging(plan.staging_bytes)
        assert self._agent is not None
        jobs = jobs_for(plan, sources, staging.data_ptr(), *device_of(staging))
        metadata = {s.agent_name: s.agent_metadata for s in sources}
        for agent_name in dict.fromkeys(j.agent_name for j in jobs):
            self._agent.connect(agent_name, metadata[agent_name])
        t_read = time.perf_counter()
        # 3. The pull. After a failure, staging may still be written by a transfer that did not stop.
        try:
            descriptors = self._agent.read(jobs, timeout_s=max(deadline - time.monotonic(), _MIN_WAIT_S))
        except BaseException:
            self._quarantine_staging()
            raise
        t_wire = time.perf_counter()
        if self._on_after_wire is not None:
            self._on_after_wire(info.version)
        # 4. The seqlock check: a version retired while we read may have been overwritten mid-pull.
        state = self._client.get_version(name=self.name, version=info.version).state
        if state is not VersionState.READY:
            raise VersionRetiredError(
                f"version {info.version} of {self.name!r} became {state.value} during the pull; nothing installed"
            )
        # 5. The engine's tensors, as views of staging where possible.
        tensors = assemble(plan, staging)
        self._generation += 1
        t_done = time.perf_counter()
        return StagedVersion(
            version=info.version,
            tensors=tensors,
            bytes=plan.total_bytes,
            num_sources=len({j.agent_name for j in jobs}),
            num_descriptors=descriptors,
            staging_bytes=staging.numel(),
            generation=self._generation,
            timings={
                "plan": t_plan - t0,
                "prepare": t_read - t_plan,
                "wire": t_wire - t_read,
                "validate": t_done - t_wire,
            },
        )

    def install(self, staged: StagedVersion) -> UpdateResult:
        """Install a staged version into the engine (the engine validates before writing)."""
        if staged.generation != self._generation:
            raise ConfigError("this staged version was overwritten by a later fetch; fetch again")
        t0 = time.perf_counter()
        self.engine.install(staged.tensors)
        install_s = time.perf_counter() - t0
        timings = dict(staged.timings, install=install_s)
        result = UpdateResult(
            version=staged.version,
            bytes=staged.bytes,
            seconds=sum(timings.values()),
            num_tensors=len(staged.tensors),
            num_sources=staged.num_sources,
            num_descriptors=staged.num_descriptors,
            staging_bytes=staged.staging_bytes,
            wire_seconds=timings["wire"],
            install_seconds=install_s,
            timings=timings,
        )
        logger.info(
            "%s: installed v%d, %d bytes from %d source(s) in %.3fs (wire %.3fs, %.2f GB/s)",
            self.name,
            result.version,
            result.bytes,
            result.num_sources,
            result.seconds,
            result.wire_seconds,
            result.gbps,
        )
        return result

    def update_weights(self, version: int | None = None, *, timeout_s: float | None = None) -> UpdateResult:
        """Fetch `version` (default: newest READY) and install it; the engine keeps its old weights on error."""
        return self.install(self.fetch(version, timeout_s=timeout_s))

    # -- life cycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._agent is not None:
            self._release_quarantine()
            if self._quarantine:
                # Closing the agent cannot stop those transfers either: keep their memory out of reuse.
                logger.warning("%s: a failed read is still running; its staging stays allocated", self.name)
                _PARKED.extend(self._quarantine)
            self._agent.close()
            self._agent = None
        self._quarantine.clear()
        self._staging = None
        self._client.close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
