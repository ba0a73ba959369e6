"""Catalog fixtures: a real gRPC catalog server on a port it binds itself (port 0), over the memory store
or a real Redis; an address that refuses connections (`closed_port`).

Redis cases use `REFIT_TEST_REDIS` (default redis://127.0.0.1:6379/15) with a key prefix unique to
the test, and delete that prefix's keys afterwards. They are marked `redis` and skipped (not failed)
when no Redis server answers there, so `make test` stays meaningful on a machine without one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from refit.catalog.client import CatalogClient
from refit_server import CatalogServer
from tests.support import hf_models as hm
from tests.support import ports
from tests.support.cluster import TrainerCluster
from tests.support.refit_harness import Trainer

REDIS_URL = os.environ.get("REFIT_TEST_REDIS", "redis://127.0.0.1:6379/15")


def _redis_client():  # redis is imported lazily: only the Redis cases need it
    import redis

    parts = urlsplit(REDIS_URL)
    db = int(parts.path.strip("/") or 0)
    return redis.Redis(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=db, socket_timeout=2)


@contextlib.contextmanager
def redis_prefix(tag: str) -> Iterator[str]:
    """A store URL on the test Redis with a fresh key prefix `tag-...`; its keys are deleted afterwards.
    Skips the test when the test Redis does not answer."""
    client = _redis_client()
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure to reach Redis means "skip", not "error"
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    prefix = f"{tag}-{uuid.uuid4().hex[:12]}"
    try:
        yield f"{REDIS_URL}?prefix={prefix}"
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A store URL on the test Redis with a fresh key prefix; its keys are deleted afterwards."""
    with redis_prefix("refit-test") as url:
        yield url


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest) -> str:
    """Every catalog test runs once per store: both must behave identically."""
    if request.param == "memory":
        return "memory"
    return request.getfixturevalue("redis_url")


@pytest.fixture
def catalog_server(store_url: str) -> Iterator[CatalogServer]:
    # Every retired version stays: these tests read them back. Retention has its own tests
    # (test_catalog_retention.py).
    with CatalogServer(store=store_url, port=0, max_workers=4, keep_retired=None).start() as server:
        yield server


@pytest.fixture
def catalog_client(catalog_server: CatalogServer) -> Iterator[CatalogClient]:
    with CatalogClient(catalog_server.address, timeout_s=5.0) as client:
        yield client


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that refuses connections, held (bound, never listening) for the whole test."""
    with ports.closed_port() as port:
        yield port


# --- trainer cluster (owned by tests/support/cluster.py) ----------------------------------------

TRAINER_WORLD_SIZE = 8


@pytest.fixture(scope="session")
def trainer_cluster() -> Iterator[TrainerCluster]:
    """`TRAINER_WORLD_SIZE` gloo trainer processes (real megatron-core on CPU), started once and shared.

    Start-up takes about 16 s on 2 idle cores. Tests keep their models under unique `key`s and
    drop them when done. A command that times out kills the cluster; later users fail fast.
    """
    with TrainerCluster(world_size=TRAINER_WORLD_SIZE, timeout_s=300.0) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def catalog() -> Iterator[str]:
    """An embedded memory catalog shared by one test module's refits (each model has its own name)."""
    with CatalogServer(store="memory", port=0).start() as server:
        yield server.address


@pytest.fixture
def trainer(trainer_cluster: TrainerCluster, catalog: str, tmp_path):
    """Factory: `trainer(case, tp=2, pp=1)` builds the model on the cluster; dropped after the test."""
    made: list[Trainer] = []

    def make(case: hm.ModelCase, **layout: int | None) -> Trainer:
        made.append(Trainer(trainer_cluster, catalog, tmp_path, case, **layout))
        return made[-1]

    yield make
    for t in made:
        t.close()
