"""A receiver's plan of its engine rank's reads, cached under the catalog's layout digest.

A refit of an unchanged layout reuses the plan (and the digest index that goes with it): the catalog's
layout digest covers everything a plan depends on, so the receiver asks the catalog only whether it
still matches, and for the trainer ranks the plan reads. A plan is made anew when the layout changes
or when a source died (its tensors then come from a replica).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from refit.catalog.values import Resolved
from refit.engines.base import Engine, EngineSpec, TensorSpec, check_compatible, check_tensors
from refit.errors import LayoutError, VersionNotFoundError
from refit.plan.cost import LinkCost
from refit.plan.liveness import source_dead
from refit.plan.planner import Plan, plan_refit
from refit.plan.targets import Target
from refit.plan.verify import DigestIndex, Verifier
from refit.types import SourceRecord

Dead = Mapping[int, tuple[str, str]]  # rank -> (agent, why) of the sources not to read from


class PlanCache:
    """The plan of one engine rank (the engine's spec, layout, stripe and staging choices fixed)."""

    def __init__(
        self,
        *,
        name: str,
        engine: Engine,
        spec: EngineSpec,
        stripe: int,
        link_cost: LinkCost,
        max_overread: float,
        window: int | None,
        dests: Mapping[str, torch.Tensor] | None,
        direct: bool,
        direct_min_bytes: int,
        layered: bool,
        direct_min_local: int | None = None,
    ) -> None:
        self._name = name
        self._engine = engine
        self._spec = spec
        self._layout = spec.layout()
        self._stripe = stripe
        self._link_cost, self._max_overread = link_cost, max_overread
        self._window = window
        self._dests = dests
        self._direct = direct
        self._direct_min = direct_min_bytes
        # Sources this process copies from itself (`refit.transport.cuda_ipc`) pay no descriptor cost:
        # with `direct_min_local` set, a plan of only such sources reads a piece that is one run of
        # one engine tensor directly from that size (`plan_refit`'s `direct_min_whole`).
        self._direct_min_local = direct_min_local
        self.local: Callable[[Sequence[SourceRecord]], bool] | None = None
        self._layered = layered
        self.key: tuple[object, ...] | None = None
        self.plan: Plan | None = None
        self.index: DigestIndex | None = None

    def key_of(self, resolved: Resolved, dead: Dead) -> tuple[object, ...]:
        # The catalog's layout digest covers what a plan depends on; without one (an older catalog)
        # the key is the records themselves. Where the sources are decides which runs are direct.
        return (
            resolved.layout_digest,
            resolved.info.model,
            () if resolved.layout_digest else resolved.sources,
            frozenset(dead),
            self._local_plan(resolved.sources),
        )

    def _local_plan(self, sources: Sequence[SourceRecord]) -> bool:
        return self._direct_min_local is not None and self.local is not None and self.local(sources)

    def fits(self, resolved: Resolved, dead: Dead) -> bool:
        """Whether the cached plan serves `resolved` with these sources dead."""
        return self.plan is not None and self.key_of(resolved, dead) == self.key

    def known(self) -> tuple[str, tuple[int, ...]]:
        """(layout digest, trainer ranks read) of the cached plan, for the catalog; ("", ()) when none."""
        if self.key is None or not self.key[0] or self.plan is None:
            return "", ()
        return str(self.key[0]), tuple(sorted(self.plan.bytes_by_rank))

    def plan_for(self, resolved: Resolved, dead: Dead) -> Plan:
        """The plan over the live sources; raises before anything is allocated if the engine cannot take it."""
        info, sources = resolved.info, resolved.sources
        if self.plan is not None and self.fits(resolved, dead):
            return self.plan
        if resolved.tensors_omitted:  # the receiver resolves in full whenever the cached plan does not fit
            raise VersionNotFoundError(f"{self._name!r} v{info.version}: the catalog omitted tensors for a stale plan")
        check_compatible(self._spec, info.model)
        live = [s for s in sources if s.rank not in dead]
        whole_min = self._direct_min_local if self._local_plan(sources) else None
        try:
            plan = plan_refit(model=info.model, sources=live, layout=self._layout, stripe=self._stripe,
                              cost=self._link_cost, max_overread=self._max_overread,
                              window=self._window if self._dests is not None or self._layered else None,
                              direct=self._accepts_direct if self._direct else None,
                              direct_min_bytes=max(self._direct_min, 1),
                              direct_min_whole=None if whole_min is None else max(whole_min, 1),
                              layer_of=self._layer_of if self._layered else None)  # fmt: skip
            planned = {t.hf_name: TensorSpec(shape=t.shape, dtype=t.dtype) for t in plan.targets}
            check_tensors(self._engine.expected(), planned)
        except LayoutError as exc:
            if not dead:
                raise
            raise source_dead(self._name, info.version, dead, exc) from exc
        self.key, self.plan = self.key_of(resolved, dead), plan
        self.index = DigestIndex(sources)  # digest places follow the layout, cached with the plan
        return plan

    def verifier(self, resolved: Resolved) -> Verifier | None:
        """The digest check of `resolved`'s pull (None before a plan)."""
        return None if self.index is None else Verifier(self.index, resolved.sources, version=resolved.info.version)

    def _accepts_direct(self, target: Target) -> bool:
        assert self._dests is not None
        dest = self._dests.get(target.hf_name)
        return dest is not None and dest.is_contiguous() and dest.numel() > 0

    def _layer_of(self, target: Target) -> tuple[int, str]:
        return self._engine.layer_of(target.hf_name)  # type: ignore[attr-defined]
