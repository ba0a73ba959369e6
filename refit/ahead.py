"""Pulling a version ahead of the catalog's answer: a receiver with a cached plan reads the trainers'
version words (`refit.trainer.fence`) instead of waiting for a `Resolve` round trip, starts its
streamed pull at once, and asks the catalog meanwhile.

Why: after seconds of generation the catalog round trip that names the version costs 2-2.5 ms on two
H200s, the largest fixed part of a refit; the words cost one 8-byte READ per trainer rank.

When: the receiver's last refit went through the catalog (its plan, sources and their words are
known), every source it reads has a word, all words hold one version, and that version is newer
than the one installed (or is the pinned one). Otherwise the refit goes through the catalog as
before. The version words are a seqlock read on both sides of the pull: before (here) they name the
version whose bytes are in place, after (`CatalogVersions.start_check`) they prove nothing changed.

What the catalog's answer must confirm (`confirm`, on a thread of its own as soon as it arrives;
the pull waits for it after its last byte has landed, before the digests are compared): the version
is the newest READY one (or the pinned one, READY), its layout is the one the plan was made for,
its sources are still where the pull read them, none of them is dead, and their digests (which the
check then compares with) cover the same blocks. Any difference raises `AheadMissed`: the engine is
torn, and the receiver pulls again through the catalog, pinned or not (nothing says the version is
bad).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from refit.catalog.client import CatalogClient
from refit.catalog.values import Resolved
from refit.config import MIN_WAIT_S
from refit.errors import LayoutError, RefitError
from refit.plan.records import Plan
from refit.plan.verify import Verifier
from refit.plan_cache import PlanCache
from refit.reads import addressing
from refit.staged import StagedVersion
from refit.staging import StagingPool
from refit.types import WORD_RETIRED, SourceRecord, VersionState, have_words

logger = logging.getLogger(__name__)


class AheadMissed(RefitError):
    """The catalog's answer does not confirm a pull begun ahead of it; the receiver pulls again
    through the catalog (never raised to a caller of `update_weights`)."""


def version_in_words(pool: StagingPool, sources: Sequence[SourceRecord], deadline: float) -> int | None:
    """The version every one of `sources`' words holds, or None: a source without a word, words that
    disagree or are retired. A word that cannot be read raises TransportError naming its agent."""
    if not have_words(sources):
        return None
    words = set(pool.read_words(sources, deadline))
    return words.pop() if len(words) == 1 and WORD_RETIRED not in words else None


def confirm(
    answer: Callable[[], Resolved], *, prev: Resolved, plan: Plan, version: int, fits: Callable[[Resolved], bool]
) -> Resolved:
    """The catalog's answer, checked against the pull of `version` begun from `prev`'s sources with
    `plan` (`fits`: whether the cached plan serves an answer). Raises AheadMissed naming what differs."""
    try:
        got = answer()
    except RefitError as exc:
        raise AheadMissed(f"v{version}: the catalog's answer failed: {exc}") from exc
    why = ""
    ranks = set(plan.bytes_by_rank)
    if got.info.state is not VersionState.READY or got.info.version != version:
        why = f"its newest READY version is v{got.info.version}" if got.info.version != version else "it is not READY"
    elif not got.tensors_omitted or got.layout_digest != prev.layout_digest or not fits(got):
        why = "its layout is not the one the plan was made for"
    elif ranks & set(got.info.dead_ranks):
        why = f"trainer rank(s) {sorted(ranks & set(got.info.dead_ranks))} are dead"
    else:
        was, now = plan.sources_read(prev.sources), plan.sources_read(got.sources)
        if addressing(now) != addressing(was) or [s.fence_addr for s in now] != [s.fence_addr for s in was]:
            why = "its sources are not where the pull read them"
    if why:
        raise AheadMissed(f"v{version} was pulled ahead of the catalog, whose answer differs: {why}")
    return got


def _confirmed(
    answer: Callable[[], Resolved],
    *,
    prev: Resolved,
    plan: Plan,
    version: int,
    fits: Callable[[Resolved], bool],
    verifier: Verifier | None,
) -> Resolved:
    """`confirm`, then the digests the check compares with bound to the answer's (`Verifier.expect`:
    only its `compare`, after the last byte, reads them)."""
    got = confirm(answer, prev=prev, plan=plan, version=version, fits=fits)
    if verifier is not None:
        try:
            verifier.expect(got.sources, version)
        except LayoutError as exc:
            raise AheadMissed(f"v{version}: {exc}") from exc
    return got


@dataclass(frozen=True, kw_only=True, slots=True)
class Begun:
    """A streamed pull begun ahead of the catalog's answer: what the receiver installs."""

    version: int
    plan: Plan
    sources: tuple[SourceRecord, ...]  # the records of the catalog's last answer (those `plan` reads among them)
    verifier: Verifier | None  # compares with the new version's digests once `confirm` has run
    confirm: Callable[[], None]  # once the last byte has landed: waits for the checked answer, or AheadMissed


class Ahead:
    """A receiver's pulls ahead of the catalog: the catalog's last answer its plan serves (`resolved`,
    None after a failover), the version installed last, counts, and the thread that checks answers."""

    def __init__(self, client: CatalogClient, name: str) -> None:
        self._client = client
        self._name = name
        self.resolved: Resolved | None = None
        self.installed = -1
        self.begun = 0
        self.missed = 0
        self._checker: ThreadPoolExecutor | None = None

    def begin(
        self, version: int | None, *, plans: PlanCache, pool: StagingPool, verify: bool, deadline: float
    ) -> Begun | None:
        """Begin `version` (None: the newest) from the trainers' words, or None: ask the catalog. A word
        that cannot be read raises TransportError naming its agent (the receiver fails over)."""
        prev, plan = self.resolved, plans.plan
        if prev is None or plan is None or not plans.fits(prev, {}) or not (plan.streamed or plan.direct):
            return None  # (installed whole, nothing is written before the catalog's answer anyway)
        found = version_in_words(pool, plan.sources_read(prev.sources), deadline)
        if found is None or not (found == version or (version is None and found > self.installed)):
            return None
        known, ranks = plans.known()
        # Unpinned, the catalog is asked for its newest READY version: the words name the newest that
        # the ranks read hold, which may not be READY yet or (snapshots) not be the newest.
        answer = functools.partial(self._client.resolve, name=self._name, version=version, known_layout=known,
                                   ranks=ranks)  # fmt: skip
        if self._checker is None:
            self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"refit-ahead-{self._name}")
        verifier = plans.verifier(prev) if verify else None
        # Asked and checked on a thread of its own, off the pull's critical path: sending a gRPC call
        # costs the sending thread ~0.6 ms after idle (two H200s' host), and its answer is needed only
        # after the last byte has landed.
        checked = self._checker.submit(_confirmed, answer, prev=prev, plan=plan, version=found,
                                       fits=lambda r: plans.fits(r, {}), verifier=verifier)  # fmt: skip
        self.begun += 1

        def done() -> None:
            try:
                self.resolved = checked.result(timeout=max(deadline - time.monotonic(), MIN_WAIT_S))
            except TimeoutError as exc:
                raise AheadMissed(f"v{found}: the catalog did not answer within the pull's deadline") from exc

        return Begun(version=found, plan=plan, sources=prev.sources, verifier=verifier, confirm=done)

    def fetch(
        self,
        version: int | None,
        *,
        plans: PlanCache,
        pool: StagingPool,
        dests: Mapping[str, torch.Tensor],
        device: torch.device,
        verify: bool,
        deadline: float,
        read_deadline: float,
        generation: int,
        mapped: bool = False,
    ) -> StagedVersion | None:
        """`begin`, then the staging slots of its plan: the version the receiver's install pulls, or None.
        `mapped`: copy its chunks out of the trainers' mapped memory where it can (`StagingPool.prefetch`)."""
        t0 = time.perf_counter()
        begun = self.begin(version, plans=plans, pool=pool, verify=verify, deadline=read_deadline)
        if begun is None:
            return None
        t_plan = time.perf_counter()
        plan = begun.plan
        # Its slots (or the mapped regions to copy out of); nothing is pulled.
        *_, regions = pool.prefetch(plan, begun.sources, deadline, device, chunks=0, dests=dests, mapped=mapped)
        return StagedVersion(
            version=begun.version, tensors={}, bytes=plan.total_bytes, num_descriptors=0,
            num_sources=len(plan.bytes_by_rank), staging_bytes=0 if regions else plan.staging_bytes,
            generation=generation, streamed=True, plan=plan, sources=begun.sources, verifier=begun.verifier,
            confirm=begun.confirm, mapped=regions,
            timings={"plan": t_plan - t0, "prepare": time.perf_counter() - t_plan, "wire": 0.0, "validate": 0.0},
        )  # fmt: skip

    def close(self) -> None:
        if self._checker is not None:
            self._checker.shutdown(wait=True)
            self._checker = None
