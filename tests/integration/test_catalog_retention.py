"""Retention: a catalog keeps the newest `keep_retired` RETIRED versions of each model and deletes the
older ones with their source records, so its memory stays bounded however many versions a run
publishes. Every test runs over the memory store and a real Redis (where the model's key count is
checked too); a deleted version still reads as retired, never as a version that could come back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from refit.catalog.client import CatalogClient
from refit.errors import ConfigError, VersionNotFoundError, VersionRetiredError
from refit.types import VersionState
from refit_server import CatalogServer
from refit_server.stores import MemoryStore
from tests.integration.conftest import _redis_client
from tests.support import catalog_samples as samples

WORLD = 2
RUN = 50


def publish(client: CatalogClient, name: str, version: int) -> None:
    for r in range(WORLD):
        client.publish(name=name, version=version, world_size=WORLD, model=samples.MODEL, source=samples.source(r))


def redis_keys(store_url: str) -> int | None:
    """How many keys the test's prefix holds in Redis (None for the memory store)."""
    if store_url == "memory":
        return None
    prefix = store_url.split("prefix=")[1]
    client = _redis_client()
    try:
        return sum(1 for _ in client.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        client.close()


@pytest.fixture
def serve(store_url: str) -> Iterator:
    servers: list[CatalogServer] = []

    def start(keep_retired: int | None) -> CatalogClient:
        servers.append(CatalogServer(store=store_url, port=0, keep_retired=keep_retired).start())
        return CatalogClient(servers[-1].address, timeout_s=10.0)

    yield start
    for s in servers:
        s.stop()


@pytest.mark.parametrize("keep", [2, 0])
def test_a_long_run_stays_bounded(serve, store_url: str, keep: int) -> None:
    """Publish, then retire the older versions, RUN times (what a trainer does every step)."""
    with serve(keep) as client:
        publish(client, "m", 0)
        counts = []
        for v in range(1, RUN):
            publish(client, "m", v)
            assert client.retire(name="m", version=v - 1, and_older=True) == [v - 1]
            counts.append((len(client.list_versions(name="m")), redis_keys(store_url)))
        # Versions kept: the READY one plus `keep` retired ones, after every step from the keep-th on.
        assert {n for n, _ in counts[keep:]} == {keep + 1}
        if store_url != "memory":
            # A version is five keys (hash, sources, heads, layouts, agents); plus the versions zset,
            # the claims-free model's pruned marker and generation, and the global names set.
            assert {k for _, k in counts[keep + 1 :]} == {5 * (keep + 1) + 4}

        kept = client.list_versions(name="m")
        assert [i.version for i in kept] == list(range(RUN - 1 - keep, RUN))
        assert [i.state for i in kept] == [VersionState.RETIRED] * keep + [VersionState.READY]
        assert client.latest(name="m").version == RUN - 1
        assert client.resolve(name="m").info.version == RUN - 1
        newest_retired = client.latest(name="m", state=VersionState.RETIRED)
        assert (newest_retired.version if newest_retired else None) == (RUN - 2 if keep else None)
        if keep:
            assert client.resolve(name="m", version=RUN - 2).info.state is VersionState.RETIRED

        # A deleted version still reads as retired: never as unknown, never publishable again.
        gone = RUN - 2 - keep
        assert client.version_state(name="m", version=gone) is VersionState.RETIRED
        for read in (
            lambda: client.get_version(name="m", version=gone),
            lambda: client.get_sources(name="m", version=gone),
            lambda: client.resolve(name="m", version=gone),
            lambda: client.wait_ready(name="m", version=gone, timeout_s=30.0),
        ):
            with pytest.raises(VersionRetiredError, match=f"v{gone} is RETIRED and its record was deleted"):
                read()
        with pytest.raises(VersionRetiredError):
            publish(client, "m", 0)
        assert client.retire(name="m", version=gone) == []  # idempotent
        # A number above the newest deleted one that was never published is just unknown.
        with pytest.raises(VersionNotFoundError):
            client.get_version(name="m", version=RUN + 5)


def test_none_keeps_every_version_and_models_are_independent(serve, store_url: str) -> None:
    with serve(None) as client:
        for v in range(6):
            publish(client, "keep-all", v)
            publish(client, "other", v)
        client.retire(name="keep-all", version=5, and_older=True)
        assert [i.state for i in client.list_versions(name="keep-all")] == [VersionState.RETIRED] * 6
    if store_url == "memory":
        return  # the rest needs a second server on the same state
    with serve(1) as client:  # the same Redis under a server with retention: "other" is untouched
        client.retire(name="keep-all", version=5)
        assert [i.version for i in client.list_versions(name="keep-all")] == [5]
        assert [i.version for i in client.list_versions(name="other")] == list(range(6))


def test_staging_and_ready_versions_are_never_deleted(serve) -> None:
    with serve(0) as client:
        publish(client, "m", 1)  # READY
        client.publish(name="m", version=2, world_size=WORLD, model=samples.MODEL, source=samples.source(0))  # STAGING
        publish(client, "m", 3)
        client.retire(name="m", version=3)
        assert {i.version: i.state for i in client.list_versions(name="m")} == {
            1: VersionState.READY,
            2: VersionState.STAGING,
        }
        # A deleted number above live ones: older live versions stay readable and publishable.
        client.publish(name="m", version=2, world_size=WORLD, model=samples.MODEL, source=samples.source(1))
        assert client.get_version(name="m", version=2).state is VersionState.READY


def test_memory_store_size_is_bounded() -> None:
    store = MemoryStore(keep_retired=3)
    for v in range(RUN):
        for r in range(WORLD):
            store.publish(name="m", version=v, world_size=WORLD, model=samples.MODEL, source=samples.source(r), now=1.0)
        store.retire(name="m", version=v, and_older=True)
    assert store.size() == 3


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_keep_retired_is_refused_at_construction(bad: object) -> None:
    with pytest.raises(ConfigError, match="keep_retired must be None or an int >= 0"):
        CatalogServer(keep_retired=bad)  # type: ignore[arg-type]
