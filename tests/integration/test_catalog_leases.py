"""Leases end to end: CatalogClient -> real gRPC server -> memory store or a real Redis.

A trainer rank claims with a lease and renews it by heartbeat; when the catalog hears nothing for a
lease, the rank is dead: its STAGING versions FAIL, its READY versions list it in `dead_ranks`.
Expiry is evaluated lazily, on the next call that touches the model (no background thread), so the
tests wait past the lease and then read. Every test runs over both stores.
"""

from __future__ import annotations

import time

import pytest

from refit.catalog.client import CatalogClient
from refit.config import Timeouts
from refit.errors import ConfigError, LeaseExpiredError, VersionFailedError
from refit.trainer.lease import Lease
from refit.types import VersionState
from refit_server import CatalogServer
from tests.support import catalog_samples as samples

WORLD = 2
LEASE_S = 0.4


def publish(client: CatalogClient, version: int, rank: int, *, agent: str | None = None):
    return client.publish(
        name="m",
        version=version,
        world_size=WORLD,
        model=samples.MODEL,
        source=samples.source(rank, tp_size=WORLD, agent=agent),
    )


def lapse() -> None:
    time.sleep(LEASE_S * 2.5)


def test_heartbeats_keep_a_lease_alive(catalog_client: CatalogClient) -> None:
    claim = catalog_client.claim(name="m", rank=0, agent_name="agent-0", lease_s=LEASE_S)
    assert claim.lease_s == LEASE_S and claim.lease_expires_at > 0
    publish(catalog_client, 1, 0)
    # Renewed well within the lease for several leases' time: the rank never dies.
    for _ in range(8):
        time.sleep(LEASE_S / 4)
        renewed = catalog_client.heartbeat(name="m", rank=0, agent_name="agent-0")
        assert renewed.agent_name == "agent-0" and renewed.lease_s == LEASE_S
    assert renewed.lease_expires_at > claim.lease_expires_at
    info = catalog_client.get_version(name="m", version=1)
    assert info.state is VersionState.STAGING and info.failure == "" and info.dead_ranks == ()


def test_a_lapsed_rank_fails_its_staging_version(catalog_client: CatalogClient) -> None:
    catalog_client.claim(name="m", rank=0, agent_name="agent-0", lease_s=LEASE_S)
    catalog_client.claim(name="m", rank=1, agent_name="agent-1")  # no lease: never lapses
    publish(catalog_client, 1, 1)  # rank 0 dies before publishing its part
    lapse()
    assert catalog_client.version_state(name="m", version=1) is VersionState.FAILED
    info = catalog_client.get_version(name="m", version=1)
    assert info.state is VersionState.FAILED
    assert info.failure == "rank 0 (agent 'agent-0') lost its lease"
    # Terminal: no part is accepted, retire leaves it, no heartbeat renews the dead claim.
    with pytest.raises(VersionFailedError, match=r"rank 0 .*lost its lease"):
        publish(catalog_client, 1, 0)
    assert catalog_client.retire(name="m", version=1, and_older=True) == []
    assert catalog_client.get_version(name="m", version=1).state is VersionState.FAILED
    with pytest.raises(LeaseExpiredError, match="no longer held by agent 'agent-0'"):
        catalog_client.heartbeat(name="m", rank=0, agent_name="agent-0")
    with pytest.raises(VersionFailedError):
        catalog_client.wait_ready(name="m", version=1, timeout_s=1.0)
    # The rank comes back: it claims again and publishes a new version, which becomes READY.
    catalog_client.claim(name="m", rank=0, agent_name="agent-0", lease_s=LEASE_S)
    publish(catalog_client, 2, 0)
    assert publish(catalog_client, 2, 1).state is VersionState.READY
    assert catalog_client.resolve(name="m").info.version == 2


def test_a_lapsed_rank_is_dead_in_its_ready_versions(catalog_client: CatalogClient) -> None:
    catalog_client.claim(name="m", rank=1, agent_name="agent-1", lease_s=LEASE_S)
    publish(catalog_client, 1, 0)
    publish(catalog_client, 1, 1)
    publish(catalog_client, 2, 0, agent="other-0")  # rank 1 never publishes v2
    publish(catalog_client, 3, 0)
    publish(catalog_client, 3, 1)
    catalog_client.retire(name="m", version=3)
    lapse()
    resolved = catalog_client.resolve(name="m")
    assert resolved.info.version == 1 and resolved.info.state is VersionState.READY
    assert resolved.info.dead_ranks == (1,)
    assert resolved.info.failure == "rank 1 (agent 'agent-1') lost its lease"
    # The sources stay listed (their coordinates still say which replica held what).
    assert [s.rank for s in resolved.sources] == [0, 1]
    assert catalog_client.get_version(name="m", version=2).state is VersionState.FAILED
    retired = catalog_client.get_version(name="m", version=3)
    assert retired.state is VersionState.RETIRED and retired.dead_ranks == ()
    listed = {i.version: i for i in catalog_client.list_versions(name="m")}
    assert listed[1].dead_ranks == (1,) and listed[2].state is VersionState.FAILED
    latest = catalog_client.latest(name="m")
    assert latest is not None and latest.dead_ranks == (1,)


def test_a_ready_part_of_another_agent_is_not_killed(catalog_client: CatalogClient) -> None:
    publish(catalog_client, 1, 0)
    publish(catalog_client, 1, 1, agent="first-1")  # rank 1's part is first-1's; first-1 then left
    catalog_client.claim(name="m", rank=1, agent_name="second-1", lease_s=LEASE_S)
    lapse()
    info = catalog_client.get_version(name="m", version=1)
    assert info.state is VersionState.READY and info.dead_ranks == ()


def test_release_and_reclaim_end_a_lease_without_killing(catalog_client: CatalogClient) -> None:
    catalog_client.claim(name="m", rank=0, agent_name="agent-0", lease_s=LEASE_S)
    catalog_client.claim(name="m", rank=1, agent_name="agent-1", lease_s=LEASE_S)
    publish(catalog_client, 1, 0)
    catalog_client.release(name="m", rank=0, agent_name="agent-0")
    catalog_client.claim(name="m", rank=1, agent_name="agent-1", lease_s=0)  # the holder drops its lease
    lapse()
    assert catalog_client.get_version(name="m", version=1).state is VersionState.STAGING
    with pytest.raises(LeaseExpiredError, match="not held"):
        catalog_client.heartbeat(name="m", rank=0, agent_name="agent-0")


def test_a_bad_lease_is_refused_before_any_change(catalog_client: CatalogClient) -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="lease_s"):
            catalog_client.claim(name="m", rank=0, agent_name="agent-0", lease_s=bad)
    catalog_client.claim(name="m", rank=0, agent_name="someone")  # nothing was claimed above


@pytest.mark.redis
def test_servers_sharing_redis_agree_on_a_lapse(redis_url: str) -> None:
    with (
        CatalogServer(store=redis_url, port=0).start() as one,
        CatalogServer(store=redis_url, port=0).start() as two,
        CatalogClient(one.address) as a,
        CatalogClient(two.address) as b,
    ):
        a.claim(name="m", rank=0, agent_name="agent-0", lease_s=LEASE_S)
        publish(a, 1, 1)
        b.heartbeat(name="m", rank=0, agent_name="agent-0")  # renewed through the other server
        lapse()
        assert b.version_state(name="m", version=1) is VersionState.FAILED
        assert a.get_version(name="m", version=1).failure == "rank 0 (agent 'agent-0') lost its lease"


def test_a_publishers_lease_renews_itself_and_is_claimed_again_after_a_lapse(catalog_client: CatalogClient) -> None:
    lease = Lease(catalog_client, name="m", rank=0, agent_name="agent-0", lease_s=LEASE_S, heartbeat_s=LEASE_S / 4)
    lease.claim()
    try:
        publish(catalog_client, 1, 0)
        lapse()  # the heartbeat thread keeps it alive
        assert catalog_client.get_version(name="m", version=1).state is VersionState.STAGING
        assert lease.renewals > 1 and lease.lapses == 0
    finally:
        lease.stop()
    lapse()  # a stalled process: no heartbeats for longer than the lease
    assert catalog_client.get_version(name="m", version=1).state is VersionState.FAILED
    lease.beat()  # it resumes: told the lease lapsed, it claims the rank again at once
    assert (lease.lapses, lease.lapsed) == (1, False)
    catalog_client.heartbeat(name="m", rank=0, agent_name="agent-0")  # held again
    publish(catalog_client, 2, 0)
    assert publish(catalog_client, 2, 1).state is VersionState.READY


def test_lease_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="heartbeat_s <= lease_s / 2"):
        Timeouts(lease_s=1.0, heartbeat_s=0.6)
    with CatalogClient("127.0.0.1:1") as client, pytest.raises(ConfigError, match="lease_s > 0"):
        Lease(client, name="m", rank=0, agent_name="a", lease_s=0.0, heartbeat_s=0.1)
