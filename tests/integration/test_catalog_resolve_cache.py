"""The catalog's cache of encoded `Resolve` replies (`refit_server.replies`), on real gRPC servers over the
memory store and a real Redis: every change a reader could see (a publish, a retire, a lapsed lease,
a change made through another server sharing the Redis) is seen by the next `Resolve`, whatever the
cache holds; replies equal the records published; concurrent misses are computed once.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from refit.catalog.client import CatalogClient
from refit.errors import VersionNotFoundError
from refit.types import SourceRecord, VersionState
from refit_server import CatalogServer
from tests.support import catalog_samples as samples

WORLD = 2


def part(rank: int, version: int) -> SourceRecord:
    """Rank `rank`'s part of `version`: its agent metadata names the version, so a stale reply shows."""
    return samples.source(rank, tp_size=WORLD, agent=f"agent-{rank}", metadata=f"meta v{version}".encode())


def publish(client: CatalogClient, version: int, ranks: tuple[int, ...] = tuple(range(WORLD))) -> None:
    for r in ranks:
        client.publish(name="m", version=version, world_size=WORLD, model=samples.MODEL, source=part(r, version))


def check(client: CatalogClient, expect: int, *, ranks: tuple[int, ...] = tuple(range(WORLD)), **kwargs: object):
    """Resolve, and check the reply against what was published for version `expect`."""
    resolved = client.resolve(name="m", ranks=kwargs.pop("filter", ()), **kwargs)
    version = expect
    assert resolved.info.version == version
    want = tuple(part(r, version) for r in ranks)
    if resolved.tensors_omitted:
        want = tuple(dataclasses.replace(s, tensors=()) for s in want)
    assert resolved.sources == want
    return resolved


def test_every_change_is_seen_through_the_cache(store_url: str) -> None:
    with CatalogServer(store=store_url, port=0).start() as server, CatalogClient(server.address, timeout_s=10) as c:
        with pytest.raises(VersionNotFoundError):  # errors are not cached
            c.resolve(name="m")
        publish(c, 1)
        first = check(c, 1)
        before = server.replies.stats()
        assert check(c, 1) == first
        assert server.replies.stats().hits == before.hits + 1  # served from the cache

        publish(c, 2, ranks=(0,))  # STAGING: version 1 is still the newest READY one, still cached
        hits = server.replies.stats().hits
        check(c, 1)
        assert server.replies.stats().hits == hits + 1
        for _ in range(2):  # a STAGING version is read anew every time: its parts move no generation
            before_staging = server.replies.stats()
            staging = c.resolve(name="m", version=2)
            assert staging.info.state is VersionState.STAGING and staging.sources == (part(0, 2),)
            assert server.replies.stats().misses == before_staging.misses + 1
        publish(c, 2, ranks=(1,))  # READY
        full = check(c, 2)
        check(c, 2, ranks=(1,), filter=(1,))  # another key: only rank 1's record
        omitted = check(c, 2, known_layout=full.layout_digest)
        assert omitted.tensors_omitted and not full.tensors_omitted
        check(c, 1, version=1)  # a pinned version is its own key

        c.retire(name="m", version=2)
        check(c, 1)
        assert c.resolve(name="m", version=2).info.state is VersionState.RETIRED

        # A lapsed lease changes version 1 (rank 0 dead) with no call that writes: the reaper does it.
        c.claim(name="m", rank=0, agent_name="agent-0", lease_s=0.3)
        assert check(c, 1).info.dead_ranks == ()
        deadline = time.monotonic() + 10.0
        while check(c, 1).info.dead_ranks != (0,):
            assert time.monotonic() < deadline, "the lapsed lease never showed in Resolve"
            time.sleep(0.1)
        assert "rank 0 (agent 'agent-0') lost its lease" in check(c, 1).info.failure
        assert server.replies.stats().hits > before.hits + 1


@pytest.mark.redis
def test_a_change_made_through_another_server_sharing_redis_is_seen(redis_url: str) -> None:
    with (
        CatalogServer(store=redis_url, port=0).start() as a,
        CatalogServer(store=redis_url, port=0).start() as b,
        CatalogClient(a.address, timeout_s=10) as via_a,
        CatalogClient(b.address, timeout_s=10) as via_b,
    ):
        publish(via_b, 1)
        check(via_a, 1)
        check(via_a, 1)
        assert a.replies.stats().hits >= 1
        publish(via_b, 2)
        check(via_a, 2)
        via_b.retire(name="m", version=2)
        check(via_a, 1)


def test_concurrent_misses_are_computed_once(store_url: str) -> None:
    readers = 24
    with CatalogServer(store=store_url, port=0, max_workers=readers).start() as server:
        with CatalogClient(server.address, timeout_s=10) as c:
            publish(c, 1)
        clients = [CatalogClient(server.address, timeout_s=30, dedicated_connection=True) for _ in range(readers)]
        try:
            for client in clients:
                client.ping()  # connected before the burst
            start = threading.Barrier(readers)
            before = server.replies.stats()

            def read(client: CatalogClient) -> object:
                start.wait(timeout=30)
                return check(client, 1)

            with ThreadPoolExecutor(max_workers=readers) as pool:
                replies = list(pool.map(read, clients))
        finally:
            for client in clients:
                client.close()
        after = server.replies.stats()
        assert all(r == replies[0] for r in replies)
        assert after.misses - before.misses == 1
        assert (after.hits - before.hits) + (after.shared - before.shared) == readers - 1


def test_no_cache_when_disabled() -> None:
    with CatalogServer(port=0, resolve_cache_bytes=0).start() as server, CatalogClient(server.address) as c:
        publish(c, 1)
        check(c, 1)
        assert server.replies is None
