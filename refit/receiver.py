"""The engine hook: `Receiver.update_weights()` pulls a version and installs it into an engine.

A refit is two steps, usable separately: `fetch` resolves the version, plans the byte ranges this
engine rank needs, pulls them with one batched NIXL READ per trainer rank into a registered
staging buffer, re-checks that the version is still READY (so bytes a trainer overwrote mid-pull
are never used) and assembles the engine's tensors; `install` hands them to the engine. Nothing
touches the engine before everything is staged and validated.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from refit.catalog.client import CatalogClient
from refit.engines.base import Engine, TensorSpec, check_compatible, check_tensors
from refit.errors import ConfigError, VersionNotFoundError, VersionRetiredError
from refit.plan.assemble import assemble
from refit.plan.planner import Plan, plan_refit, stripe
from refit.plan.targets import EngineLayout
from refit.transport.nixl import NixlAgent, ReadJob, ReadOp
from refit.types import SourceRecord, UpdateResult, VersionInfo, VersionState

logger = logging.getLogger(__name__)


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
    """

    def __init__(
        self,
        *,
        catalog: str,
        engine: Engine,
        name: str = "default",
        replica: int = 0,
        timeout_s: float = 120.0,
        catalog_timeout_s: float = 10.0,
        max_staging_bytes: int | None = None,
    ) -> None:
        if not isinstance(engine, Engine):
            raise ConfigError(f"engine must implement refit.engines.Engine, got {type(engine).__name__}")
        if replica < 0 or timeout_s <= 0 or (max_staging_bytes is not None and max_staging_bytes <= 0):
            raise ConfigError("replica must be >= 0, timeout_s > 0 and max_staging_bytes positive")
        self._max_staging = max_staging_bytes
        self.engine = engine
        self.name = name
        self._spec = engine.spec()
        self._stripe = stripe(replica=replica, tp_rank=self._spec.tp_rank, tp_size=self._spec.tp_size)
        self._timeout_s = timeout_s
        self._client = CatalogClient(catalog, timeout_s=catalog_timeout_s)
        self._agent: NixlAgent | None = None
        self._staging: torch.Tensor | None = None
        self._plan_key: tuple | None = None
        self._plan: Plan | None = None
        self._generation = 0

    # -- version resolution -----------------------------------------------------------------------

    def _resolve(self, version: int | None, deadline: float) -> VersionInfo:
        if version is not None:
            remaining = max(deadline - time.monotonic(), 0.001)
            return self._client.wait_ready(name=self.name, version=version, timeout_s=remaining)
        while True:
            info = self._client.latest(name=self.name, state=VersionState.READY)
            if info is not None:
                return info
            if time.monotonic() > deadline:
                raise VersionNotFoundError(f"no READY version of {self.name!r} in the catalog")
            time.sleep(0.05)

    # -- planning and staging -----------------------------------------------------------------------

    def _plan_for(self, info: VersionInfo, sources: list[SourceRecord]) -> Plan:
        key = (info.model, tuple((s.rank, s.agent_name, s.regions, s.tensors) for s in sources))
        if key == self._plan_key and self._plan is not None:
            return self._plan
        check_compatible(self._spec, info.model)
        spec = self._spec
        layout = EngineLayout(
            tp_rank=spec.tp_rank, tp_size=spec.tp_size, vocab_size=spec.vocab_size, scheme=spec.scheme,
            padded_vocab_size=spec.padded_vocab_size,
        )  # fmt: skip
        plan = plan_refit(model=info.model, sources=sources, layout=layout, stripe=self._stripe)
        planned = {t.hf_name: TensorSpec(shape=t.shape, dtype=t.dtype) for t in plan.targets}
        check_tensors(self.engine.expected(), planned)
        self._plan_key, self._plan = key, plan
        return plan

    def _ensure_staging(self, nbytes: int) -> torch.Tensor:
        """One registered staging buffer, grown when needed, reused by every later refit."""
        if self._agent is None:
            self._agent = NixlAgent(prefix=f"refit-engine-{self.name}-tp{self._spec.tp_rank}")
        device = self.engine.device
        if self._staging is None or self._staging.numel() < nbytes or self._staging.device != device:
            if self._staging is not None:
                old = self._staging
                self._agent.deregister(old.data_ptr(), old.numel(), **_where(old))
            self._staging = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._agent.register(self._staging.data_ptr(), self._staging.numel(), **_where(self._staging))
        return self._staging

    # -- the hook ------------------------------------------------------------------------------------

    def fetch(self, version: int | None = None, *, timeout_s: float | None = None) -> StagedVersion:
        """Pull `version` (default: the newest READY one) into staging and validate it.

        Raises VersionNotFoundError, VersionNotReadyError (naming missing ranks), VersionRetiredError,
        ModelMismatchError, CatalogUnavailableError or TransportError; the engine is never touched.
        """
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
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
        info = self._resolve(version, deadline)
        sources = {s.rank: s for s in self._client.get_sources(name=self.name, version=info.version)}
        plan = self._plan_for(info, list(sources.values()))
        if self._max_staging is not None and plan.staging_bytes > self._max_staging:
            raise ConfigError(
                f"version {info.version} needs {plan.staging_bytes} bytes of staging on this rank, "
                f"over max_staging_bytes={self._max_staging}"
            )
        t_plan = time.perf_counter()
        staging = self._ensure_staging(plan.staging_bytes)
        base = staging.data_ptr()
        groups: dict[tuple[int, str, int], list[ReadOp]] = defaultdict(list)
        for r in plan.reads:
            region = next(g for g in sources[r.rank].regions if g.index == r.region)
            groups[(r.rank, region.device, region.device_id)].append(
                ReadOp(
                    local_addr=base + r.local_offset,
                    remote_addr=region.addr + r.remote_offset,
                    nbytes=r.block_bytes,
                    count=r.count,
                    local_stride=r.block_bytes,
                    remote_stride=r.remote_stride,
                )
            )
        local = _where(staging)
        jobs = []
        for (rank, device, device_id), ops in sorted(groups.items()):
            src = sources[rank]
            self._agent.connect(src.agent_name, src.agent_metadata)
            jobs.append(
                ReadJob(
                    agent_name=src.agent_name,
                    ops=ops,
                    local_device=local["device"],
                    local_device_id=local["device_id"],
                    remote_device=device,
                    remote_device_id=device_id,
                )
            )
        t_read = time.perf_counter()
        descriptors = self._agent.read(jobs, timeout_s=max(deadline - time.monotonic(), 0.001))
        t_wire = time.perf_counter()
        self._after_wire(info.version)
        # The seqlock check: a version retired while we read may have been overwritten mid-pull.
        state = self._client.get_version(name=self.name, version=info.version).state
        if state is not VersionState.READY:
            raise VersionRetiredError(
                f"version {info.version} of {self.name!r} became {state.value} during the pull; nothing installed"
            )
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

    def _after_wire(self, version: int) -> None:
        """Called between the pull and the READY re-check; a seam for instrumentation and tests."""

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
            plan_seconds=timings["plan"],
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
            self._agent.close()
            self._agent = None
        self._staging = None
        self._client.close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _where(t: torch.Tensor) -> dict[str, Any]:
    return {"device": "cuda" if t.is_cuda else "cpu", "device_id": (t.device.index or 0) if t.is_cuda else 0}
