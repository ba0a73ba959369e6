"""Which trainer ranks a pull must not read from, and the error when no live replica covers them.

Pure bookkeeping for the receiver's failover (refit/receiver.py): the catalog lists ranks whose lease
lapsed (`VersionInfo.dead_ranks`), and a fetch adds the sources whose READs failed or timed out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from refit.errors import SourceDeadError, TransportError
from refit.types import SourceRecord

LEASE_LAPSED = "lease lapsed (the catalog lists it dead)"


class DeadSources:
    """The sources one fetch or update call found dead (agent -> why), besides the catalog's."""

    def __init__(self) -> None:
        self.why: dict[str, str] = {}

    @property
    def agents(self) -> tuple[str, ...]:
        """The agents given up so far, in order."""
        return tuple(self.why)

    def excluded(self, sources: Iterable[SourceRecord], dead_ranks: Collection[int]) -> dict[int, tuple[str, str]]:
        """rank -> (agent, why) of the sources not to read from: the catalog's dead ranks and ours."""
        return {
            s.rank: (s.agent_name, self.why.get(s.agent_name, LEASE_LAPSED))
            for s in sources
            if s.rank in dead_ranks or s.agent_name in self.why
        }

    def give_up(self, exc: TransportError, ranks: Mapping[str, int]) -> int | None:
        """Record the source a failed read names (`ranks`: agent -> rank of the version being pulled);
        its rank, or None when there is nothing to fail over from (no source named, or already given up)."""
        rank = ranks.get(exc.agent_name)
        if isinstance(exc, SourceDeadError) or rank is None or exc.agent_name in self.why:
            return None
        self.why[exc.agent_name] = str(exc)
        return rank


def source_dead(name: str, version: int, excluded: Mapping[int, tuple[str, str]], cause: Exception) -> SourceDeadError:
    """The error of a pull the live sources cannot serve: every dead rank, its agent and why."""
    ranks = sorted(excluded)
    who = "; ".join(f"rank {r} (agent {excluded[r][0]!r}): {excluded[r][1]}" for r in ranks)
    return SourceDeadError(
        f"{name!r} v{version} cannot be pulled: no live replica holds all the bytes of its dead trainer "
        f"ranks ({cause}). Dead: {who}",
        ranks=ranks,
        agents=[excluded[r][0] for r in ranks],
    )
