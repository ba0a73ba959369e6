"""One engine rank's pulls: an attempt at fetching a version and at installing it into the engine.

`Receiver` (`refit.receiver`) retries attempts, fails over and owns the hook's API; an attempt is
here. A fetch resolves the version, plans this rank's reads (`refit.plan_cache`), sets up the staging
slots and pulls what fits them; a version installed whole is validated, verified and assembled at
once. An install writes it into the engine: whole (the engine validates first), or streamed through
the staging window beside direct reads (`refit.streaming`), engine memory torn until it completes.
A pull begun from the trainers' version words instead of the catalog's answer is `refit.ahead`'s.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from refit import ahead
from refit.catalog.client import CatalogClient
from refit.engines.base import Engine, EngineSpec
from refit.errors import ConfigError, DigestError
from refit.plan.assemble import assemble, assemble_chunk
from refit.plan.liveness import DeadSources
from refit.plan.planner import Plan
from refit.plan.verify import Totals
from refit.plan_cache import PlanCache
from refit.staged import ReceiverStats, StagedVersion
from refit.staging import StagingPool
from refit.streaming import stream
from refit.transport.cuda_ipc import LocalPeers
from refit.transport.nixl import NixlAgent
from refit.types import SourceRecord, UpdateResult
from refit.versions import CatalogVersions, Fences

logger = logging.getLogger(__name__)


class Puller:
    """The pulls of one engine rank into `engine`: its staging pool, plans, digest totals and the
    version words' state, and whether the engine's weights are torn."""

    def __init__(
        self,
        *,
        engine: Engine,
        name: str,
        spec: EngineSpec,
        client: CatalogClient,
        versions: CatalogVersions,
        plans: PlanCache,
        dests: Mapping[str, torch.Tensor] | None,
        layered: bool,
        max_staging_bytes: int | None,
        source_timeout_s: float | None,
        verify: bool,
        cuda_ipc: bool = True,
    ) -> None:
        self.engine = engine
        self.name = name
        self._spec = spec
        self._client = client
        self._versions = versions
        self.plans = plans
        self._dests = dests
        self._layered = layered
        self._max_staging = max_staging_bytes
        self._source_timeout_s = source_timeout_s
        self.verify = verify
        self._cuda_ipc = cuda_ipc
        # Chunks of trainer ranks mapped on this GPU copied out of their memory, not staged (`Receiver`).
        self.mapped_install = True
        device = torch.device(engine.device)
        # Trainer ranks on this host are copied from here over CUDA IPC; plans of only such ranks read
        # every run they can straight into the engine (`PlanCache`).
        self._local: LocalPeers | None = None
        if device.type == "cuda":
            self._local = LocalPeers(torch.cuda.current_device() if device.index is None else device.index)
            self._local.enabled = cuda_ipc
            plans.local = self._local.covers
        self.pool: StagingPool | None = None
        self.generation = 0
        self.torn = False
        self.checked = Totals()
        self.agents: dict[str, int] = {}  # agent name -> trainer rank, of the version being pulled
        self.ahead = ahead.Ahead(client, name)  # pulls begun from the trainers' version words

    def stats(self) -> ReceiverStats:
        pool = self.pool
        return ReceiverStats(
            registrations=pool.registrations if pool else 0,
            staging_bytes=pool.staging_bytes if pool else 0,
            peak_staging_bytes=pool.peak_bytes if pool else 0,
            quarantined=pool.quarantined if pool else 0,
            quarantined_bytes=pool.quarantined_bytes if pool else 0,
            verified_bytes=self.checked.verified_bytes,
            unverified_bytes=self.checked.unverified_bytes,
            verify_seconds=self.checked.seconds,
            ahead=self.ahead.begun,
            ahead_missed=self.ahead.missed,
            ipc_copies=self._local.copies if self._local else 0,
            shared_words=pool.word_reader.reads if pool else 0,
            mapped_chunks=pool.mapped_chunks if pool else 0,
            checked_copies=pool.checked_copies if pool else 0,
        )

    @property
    def cuda_ipc(self) -> bool:
        return self._cuda_ipc

    @cuda_ipc.setter
    def cuda_ipc(self, on: bool) -> None:
        self._cuda_ipc = on
        if self._local is not None:
            self._local.enabled = on

    def _pool_for(self) -> StagingPool:
        if self.pool is None:
            agent = NixlAgent(prefix=f"refit-engine-{self.name}-tp{self._spec.tp_rank}")
            agent.local = self._local
            self.pool = StagingPool(agent, self.name)
        return self.pool

    # -- fetch ---------------------------------------------------------------------------------------

    def fetch(self, version: int | None, deadline: float, *, prefetch: bool, dead: DeadSources) -> StagedVersion:
        """One attempt at `Receiver.fetch` (`prefetch`: pull the first chunks of a streamed version)."""
        t0 = time.perf_counter()
        # 1. Resolve the version and plan this rank's reads from its live sources (cached while the
        #    sources stay the same); a plan the engine cannot take is refused before anything is allocated.
        resolved = self._versions.resolve(version, deadline, *self.plans.known())
        excluded = dead.excluded(resolved.sources, resolved.info.dead_ranks)
        if resolved.tensors_omitted and not self.plans.fits(resolved, excluded):
            # Other sources are dead now: a new plan needs every rank's records with their tensors.
            resolved = self._client.resolve(name=self.name, version=resolved.info.version)
            excluded = dead.excluded(resolved.sources, resolved.info.dead_ranks)
        info, sources = resolved.info, resolved.sources
        self.agents = {s.agent_name: s.rank for s in sources}
        if self._local is not None:  # every rank of the version, not a subset (a words read connects fewer)
            self._local.retain(self.agents)
        if self.pool is not None:
            self.pool.word_reader.retain({s.fence_shm for s in sources})
        plan = self.plans.plan_for(resolved, excluded)
        self.ahead.resolved = None if excluded else resolved
        whole_only = self._dests is None and not self._layered
        if whole_only and self._max_staging is not None and plan.staging_bytes > self._max_staging:
            raise ConfigError(
                f"version {info.version} needs {plan.staging_bytes} bytes of staging on this rank, over "
                f"max_staging_bytes={self._max_staging}; this engine installs whole sets (no destinations())"
            )
        t_plan = time.perf_counter()
        streamed = (self._dests is not None and (plan.streamed or bool(plan.direct))) or (
            self._layered and plan.streamed
        )
        # 2. Staging slots (`Plan.slot_count`) and this fetch's reads: everything, or the first
        #    chunks that fit the window.
        t_read = time.perf_counter()
        pulled, descriptors, slots, regions = self._pool_for().prefetch(
            plan, sources, self.read_deadline(deadline), self.engine.device,
            chunks=(plan.slot_count if prefetch else 0) if streamed else 1, dests=self._dests,
            mapped=streamed and self._mapped_install(),
        )  # fmt: skip
        t_wire = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        verifier = self.plans.verifier(resolved) if self.verify else None
        timings: dict[str, float] = {}
        if not streamed:
            # 3. Whole: validate (still READY, so a digest mismatch is corruption, not a race), verify
            #    every staged block, then the engine's tensors as views of staging where possible.
            self._versions.check_ready(info.version, torn=False, fences=self._fences(plan, sources, deadline))
            if verifier is not None and plan.chunks:
                try:
                    verifier.pieces(plan.chunks[0].pieces, slots[0])
                finally:
                    self.checked.absorb(verifier, timings)
            tensors = assemble(plan, slots[0])
        self.generation += 1
        t_done = time.perf_counter() - timings.get("verify", 0.0)
        return StagedVersion(
            version=info.version,
            tensors=tensors,
            bytes=plan.total_bytes,
            num_sources=len({s.rank for s in plan.sources_read(sources)}),
            num_descriptors=descriptors,
            staging_bytes=0 if regions and not slots else plan.staging_bytes,
            generation=self.generation,
            streamed=streamed,
            pulled=pulled if streamed else 0,
            plan=plan,
            sources=tuple(sources),
            timings={"plan": t_plan - t0, "prepare": t_read - t_plan, "wire": t_wire - t_read,
                     "validate": t_done - t_wire, **timings},
            verifier=verifier if streamed else None,
            mapped=regions,
        )  # fmt: skip

    def fetch_ahead(self, version: int | None, deadline: float) -> StagedVersion | None:
        """A streamed version begun from the trainers' version words (`refit.ahead`), or None: ask the catalog."""
        if self.pool is None or self._dests is None or self.ahead.resolved is None:
            return None
        self.agents = {s.agent_name: s.rank for s in self.ahead.resolved.sources}  # a failed word fails over
        staged = self.ahead.fetch(
            version, plans=self.plans, pool=self.pool, dests=self._dests, device=self.engine.device,
            verify=self.verify, deadline=deadline, read_deadline=self.read_deadline(deadline),
            generation=self.generation + 1, mapped=self._mapped_install(),
        )  # fmt: skip
        if staged is not None:
            self.generation += 1
        return staged

    def _mapped_install(self) -> bool:
        """Whether a streamed install may copy its chunks out of the trainers' mapped memory: into the
        engine's tensors (not whole layers)."""
        return self.mapped_install and self._dests is not None and not self._layered

    def _fences(self, plan: Plan, sources: Sequence[SourceRecord], deadline: float) -> Fences:
        """The sources `plan` reads, and how to read their version words (`CatalogVersions.start_check`)."""
        assert self.pool is not None
        return plan.sources_read(sources), functools.partial(
            self.pool.read_words, deadline=self.read_deadline(deadline)
        )

    def read_deadline(self, deadline: float) -> float:
        """One pull attempt's deadline: `source_timeout_s` from now, within the call's deadline."""
        if self._source_timeout_s is None:
            return deadline
        return min(deadline, time.monotonic() + self._source_timeout_s)

    # -- install -------------------------------------------------------------------------------------

    def install(self, staged: StagedVersion, deadline: float) -> UpdateResult:
        """`Receiver.install` of a staged version of the current generation, the rest pulled by `deadline`."""
        timings = dict(staged.timings)
        descriptors = staged.num_descriptors
        if staged.streamed:
            plan = staged.plan
            assert plan is not None and (self._dests is not None or self._layered) and self.pool is not None
            install_chunk = functools.partial(self._install_chunk, plan) if self._layered else None
            self.torn = True  # from here on, engine memory may hold bytes of this version
            try:
                descriptors += stream(
                    self.pool, plan=plan, sources=staged.sources, pulled=staged.pulled, dests=self._dests or {},
                    deadline=deadline, read_deadline=self.read_deadline,
                    start_check=lambda: self._start_check(staged, deadline),
                    timings=timings,
                    install_chunk=install_chunk, verifier=staged.verifier, mapped=staged.mapped,
                    copy_direct=self._mapped_install(),
                )  # fmt: skip
            except DigestError as exc:
                raise self._versions.mismatch(exc, staged.version) from exc
            finally:
                self.checked.absorb(staged.verifier, timings)
            self.torn = False
        else:
            t0 = time.perf_counter()
            self.engine.install(staged.tensors)
            timings["install"] = time.perf_counter() - t0
            self.torn = False
        result = staged.result(timings, descriptors)
        self.ahead.installed = result.version
        logger.info(
            "%s: installed v%d, %d bytes from %d source(s) in %.3fs (wire %.3fs, %.2f GB/s, %d chunk(s))",
            self.name, result.version, result.bytes, result.num_sources, result.seconds, result.wire_seconds,
            result.gbps, result.chunks,
        )  # fmt: skip
        return result

    def _start_check(self, staged: StagedVersion, deadline: float) -> Callable[[], None]:
        """The re-check once a streamed pull's last byte has landed: the catalog's answer first, for a
        version pulled ahead of it."""
        assert staged.plan is not None
        if staged.confirm is not None:
            staged.confirm()
        fences = self._fences(staged.plan, staged.sources, deadline)
        return self._versions.start_check(staged.version, torn=True, fences=fences)

    def _install_chunk(self, plan: Plan, k: int, slot: torch.Tensor) -> None:
        """Install the whole layers of chunk k from its staging slot (engines with `install_layers()`)."""
        self.engine.install_layers(assemble_chunk(plan, plan.chunks[k], slot))  # type: ignore[attr-defined]

    def close(self) -> None:
        self.ahead.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
