"""The receiver's failover bookkeeping (refit.plan.liveness): which sources a pull must skip, and the
error that names the dead ranks when no replica covers them."""

from __future__ import annotations

from refit.errors import SourceDeadError, TransferTimeoutError, TransportError
from refit.plan.liveness import LEASE_LAPSED, DeadSources, source_dead
from tests.support import catalog_samples as samples

SOURCES = [samples.source(r, tp_size=2) for r in range(4)]  # ranks 0/2 and 1/3 are DP replicas
RANKS = {s.agent_name: s.rank for s in SOURCES}


def test_the_catalogs_dead_ranks_and_the_failed_sources_are_excluded() -> None:
    dead = DeadSources()
    assert dead.excluded(SOURCES, dead_ranks=()) == {}
    assert dead.excluded(SOURCES, dead_ranks=(3,)) == {3: ("agent-3", LEASE_LAPSED)}
    timeout = TransferTimeoutError("READ of 8 bytes from agent-1 did not finish in time", agent_name="agent-1")
    assert dead.give_up(timeout, RANKS) == 1
    assert dead.agents == ("agent-1",)
    assert dead.excluded(SOURCES, dead_ranks=(3,)) == {1: ("agent-1", str(timeout)), 3: ("agent-3", LEASE_LAPSED)}


def test_only_a_new_named_source_is_given_up() -> None:
    dead = DeadSources()
    assert dead.give_up(TransportError("NIXL rejected the transfer descriptors"), RANKS) is None  # names no agent
    assert dead.give_up(TransportError("gone", agent_name="agent-9"), RANKS) is None  # not a source of this version
    assert dead.give_up(TransportError("failed", agent_name="agent-2"), RANKS) == 2
    assert dead.give_up(TransportError("failed again", agent_name="agent-2"), RANKS) is None  # no second failover
    assert dead.give_up(SourceDeadError("no replica", agents=["agent-0"]), RANKS) is None
    assert dead.agents == ("agent-2",)


def test_the_error_names_every_dead_rank_its_agent_and_why() -> None:
    err = source_dead("m", 7, {3: ("agent-3", LEASE_LAPSED), 1: ("agent-1", "READ failed")}, ValueError("no rows"))
    assert isinstance(err, TransportError)
    assert err.ranks == (1, 3) and err.agents == ("agent-1", "agent-3") and err.agent_name == "agent-1"
    text = str(err)
    assert "'m' v7" in text and "no rows" in text
    assert "rank 1 (agent 'agent-1'): READ failed" in text and f"rank 3 (agent 'agent-3'): {LEASE_LAPSED}" in text
