"""A durable catalog: real `refit-catalog serve` processes over Redis, killed with SIGKILL and restarted;
two catalog servers sharing one Redis; a private Redis with an append-only file restarted under them.

- A catalog server killed -9 loses nothing (its state is in Redis); restarted on its port, its
  Publishers (real Megatron trainer ranks), Receivers (a real HF engine, bit-exact against the HF
  ground truth) and CatalogClients carry on: calls made while it is down are retried within their
  deadlines and succeed once it is back.
- Two servers on one Redis are one catalog: a publisher on one and a receiver on the other, ranks of one
  version published concurrently through both reach READY exactly once, and a rank's claim is
  exclusive across them (Lua scripts make each mutation atomic in Redis).
- Redis restarted (SIGTERM, then SIGKILL) with `appendonly yes` and `appendfsync always`: every
  version and claim is there afterwards, and the catalog and its clients carried on meanwhile.
- Start-up warns when Redis runs without an append-only file, or when its settings cannot be read.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from refit import Receiver
from refit.catalog.client import CatalogClient
from refit.engines import HFEngine
from refit.errors import RankTakenError
from refit.types import VersionState
from tests.integration.conftest import _redis_client, redis_prefix
from tests.support import catalog_samples as samples
from tests.support import hf_models as hm
from tests.support.catalog_procs import CatalogProcess, RedisProcess
from tests.support.refit_harness import OPS, assert_same_weights

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def shared_store() -> Iterator[str]:
    """A prefix of the test Redis shared by this module's catalog servers; deleted afterwards."""
    with redis_prefix("refit-durable") as url:
        yield url


@pytest.fixture(scope="module")
def catalog_a(shared_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CatalogProcess]:
    with CatalogProcess(shared_store, tmp_path_factory.mktemp("a") / "serve.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def catalog_b(shared_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CatalogProcess]:
    with CatalogProcess(shared_store, tmp_path_factory.mktemp("b") / "serve.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def catalog(catalog_a: CatalogProcess) -> str:
    """The trainers (the `trainer` fixture) publish through catalog server A."""
    return catalog_a.address


class _Retried(logging.Handler):
    """Set when this process's CatalogClient logs that it is retrying a call the catalog refused."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.seen.set()


def during_outage(
    down: Callable[[], None], call: Callable[[], Any], up: Callable[[], None], *, until_retried: bool = False
) -> Any:
    """Take a server down, make `call` while it is down (in a thread), bring it back; `call`'s result.

    `until_retried`: bring it back only once a client in this process has been refused and is retrying
    (Redis restarts in milliseconds; a catalog server restart takes a Python start-up, so a call made
    right after the kill meets the outage anyway).
    """
    handler, logger = _Retried(), logging.getLogger("refit.catalog.client")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        down()
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(call)
            if until_retried:
                assert handler.seen.wait(timeout=60), "the call was never refused: it did not meet the outage"
            up()
            return future.result(timeout=120)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_publisher_and_receiver_ride_out_catalog_server_kills(trainer, catalog_a, catalog_b) -> None:
    case = hm.LLAMA_GQA
    t = trainer(case, tp=2, pp=1)  # 8 trainer ranks publishing through A
    engine_model = hm.build_hf_model(case, seed=99)
    with Receiver(catalog=catalog_b.address, engine=HFEngine(engine_model), name=t.name) as rcv:
        t.publish(1)
        assert rcv.update_weights().version == 1  # published through A, resolved through B
        assert_same_weights(engine_model, t.hf)

        # A dies -9 with no warning; the trainer retires v1 and publishes v2 through it while it is down.
        v2 = t.step(seed=2)

        def step() -> list[dict]:
            t.cluster.run(f"{OPS}:invalidate", name=t.name)
            return t.publish(2)

        results = during_outage(catalog_a.kill, step, catalog_a.start)
        assert "READY" in {r["state"] for r in results}
        with CatalogClient(catalog_a.address) as client:  # the restarted A has every version
            states = {i.version: i.state for i in client.list_versions(name=t.name)}
            assert states == {1: VersionState.RETIRED, 2: VersionState.READY}
        assert rcv.update_weights().version == 2
        assert_same_weights(engine_model, v2)

        # B (the receiver's) dies -9; a refit asked for while it is down completes once it is back.
        v3 = t.step(seed=3)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(3)
        result = during_outage(catalog_b.kill, rcv.update_weights, catalog_b.start)
        assert result.version == 3
        assert_same_weights(engine_model, v3)


def test_concurrent_publish_across_two_servers_is_ready_exactly_once(catalog_a, catalog_b) -> None:
    world, versions = 8, 12
    clients = [CatalogClient(p.address, timeout_s=30.0) for p in (catalog_a, catalog_b)]
    barrier = threading.Barrier(world)

    def publish_rank(version: int, rank: int):
        barrier.wait(timeout=60)
        return clients[rank % 2].publish(
            name="race", version=version, world_size=world, model=samples.MODEL, source=samples.source(rank)
        )

    try:
        with ThreadPoolExecutor(max_workers=world) as pool:
            for v in range(versions):
                infos = list(pool.map(lambda r, v=v: publish_rank(v, r), range(world)))
                ready = [i for i in infos if i.state is VersionState.READY]
                # The one part that completed the version saw READY; every other saw STAGING, and the
                # number of ranks each saw is distinct: the scripts ran one at a time.
                assert len(ready) == 1, [(i.state, i.published_ranks) for i in infos]
                assert sorted(len(i.published_ranks) for i in infos) == list(range(1, world + 1))
                stored = clients[v % 2].get_version(name="race", version=v)
                assert stored.state is VersionState.READY and stored.ready_at == ready[0].ready_at
                assert stored.published_ranks == tuple(range(world))

            def claim(rank: int, agent: int) -> str:
                barrier.wait(timeout=60)
                try:
                    clients[agent % 2].claim(name="race", rank=rank, agent_name=f"agent-{agent}")
                    return f"agent-{agent}"
                except RankTakenError as exc:
                    return f"taken: {exc}"

            for rank in range(4):
                outcomes = list(pool.map(lambda a, rank=rank: claim(rank, a), range(world)))
                winners = [o for o in outcomes if not o.startswith("taken")]
                assert len(winners) == 1, outcomes
                assert all(winners[0] in o for o in outcomes if o.startswith("taken"))
    finally:
        for c in clients:
            c.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    if not RedisProcess.available():
        pytest.skip("redis-server is not installed")
    with RedisProcess(tmp_path) as server:
        yield server


def test_redis_restarts_with_an_append_only_file_lose_nothing(private_redis: RedisProcess, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with CatalogProcess(private_redis.url(), log) as served, CatalogClient(served.address, timeout_s=60.0) as client:
        assert "append-only" not in log.read_text()  # appendonly yes, appendfsync always: no warning
        published: dict[int, list] = {}

        def publish(version: int) -> list:
            parts = [samples.source(r, tp_size=2, agent=f"agent-{r}") for r in range(2)]
            for s in parts:
                client.publish(name="m", version=version, world_size=2, model=samples.MODEL, source=s)
            published[version] = parts
            return parts

        for r in range(2):
            client.claim(name="m", rank=r, agent_name=f"agent-{r}")
        for v in range(1, 4):
            publish(v)
        client.retire(name="m", version=1)

        for number, sig in ((4, signal.SIGTERM), (5, signal.SIGKILL)):
            # Published while Redis is down: the catalog answers UNAVAILABLE, the client retries.
            during_outage(lambda sig=sig: private_redis.stop(sig), lambda n=number: publish(n), private_redis.start,
                          until_retried=True)  # fmt: skip
            versions = {i.version: i.state for i in client.list_versions(name="m")}
            assert versions == {1: VersionState.RETIRED, **{v: VersionState.READY for v in range(2, number + 1)}}
            for v, parts in published.items():
                assert client.get_sources(name="m", version=v) == parts
            assert client.resolve(name="m").info.version == number
            with pytest.raises(RankTakenError, match="agent-0"):  # claims survived too
                client.claim(name="m", rank=0, agent_name="intruder")
    assert served.proc is not None and served.proc.returncode == 0  # stopped by SIGTERM, cleanly


def test_start_up_warns_when_redis_persistence_is_off_or_unknown(shared_store: str, tmp_path: Path) -> None:
    # The test Redis (127.0.0.1:6379) runs with its defaults here; skip if someone turned AOF on.
    client = _redis_client()
    try:
        aof = client.config_get("appendonly").get("appendonly")
    finally:
        client.close()
    if aof == "yes":
        pytest.skip("the test Redis runs with appendonly yes")
    log = tmp_path / "off.log"
    with CatalogProcess(shared_store, log):
        pass
    assert "WARNING" in log.read_text() and "without an append-only file" in log.read_text()

    if not RedisProcess.available():
        return
    locked = RedisProcess(tmp_path, "--rename-command", "CONFIG", "")
    with locked, CatalogProcess(locked.url(), tmp_path / "locked.log") as served, CatalogClient(served.address) as c:
        c.ping()  # CONFIG refused: a warning, not a failed start
    assert "cannot read the persistence settings" in (tmp_path / "locked.log").read_text()


@pytest.mark.soak
def test_soak_repeated_kills_of_servers_and_redis_lose_no_acknowledged_version(tmp_path: Path) -> None:
    """A publisher loop over two catalog servers on a private AOF Redis, while the servers are killed -9 and
    Redis is SIGKILLed over and over: every version whose publish returned is READY at the end."""
    if not RedisProcess.available():
        pytest.skip("redis-server is not installed")
    rounds, world = 30, 2
    with RedisProcess(tmp_path) as redis:
        servers = [CatalogProcess(redis.url(), tmp_path / f"serve-{i}.log").start() for i in range(2)]
        clients = [CatalogClient(s.address, timeout_s=60.0) for s in servers]
        for c in clients:
            c.ping()  # a client retries outages only once it has reached its catalog
        acknowledged: list[int] = []
        stop = threading.Event()

        def publish_loop() -> None:
            v = 0
            while not stop.is_set():
                for r in range(world):
                    clients[(v + r) % 2].publish(
                        name="soak", version=v, world_size=world, model=samples.MODEL, source=samples.source(r)
                    )
                acknowledged.append(v)
                v += 1

        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                loop = pool.submit(publish_loop)
                for i in range(rounds):
                    servers[i % 2].kill()
                    servers[i % 2].start()
                    redis.stop(signal.SIGKILL)
                    redis.start()
                    assert not loop.done(), loop.exception()
                stop.set()
                loop.result(timeout=120)
            infos = {i.version: i for i in clients[0].list_versions(name="soak")}
            assert acknowledged and all(infos[v].state is VersionState.READY for v in acknowledged)
            print(f"{len(acknowledged)} versions acknowledged across {rounds} rounds of kills: all READY")
        finally:
            for c in clients:
                c.close()
            for s in servers:
                s.stop()
