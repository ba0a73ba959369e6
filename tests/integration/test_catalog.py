"""The catalog end to end: CatalogClient -> real gRPC server -> memory store or a real Redis.

Every behaviour test runs over both stores (the `store_url` fixture), which must agree exactly.
"""

from __future__ import annotations

import re
import threading
from concurrent import futures

import grpc
import pytest

from refit.catalog.client import CatalogClient, format_ranks
from refit.errors import (
    CatalogError,
    CatalogUnavailableError,
    ConfigError,
    ConflictError,
    RankTakenError,
    VersionNotFoundError,
    VersionNotReadyError,
    VersionRetiredError,
)
from refit.proto import catalog_pb2 as pb
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit.types import VersionState
from refit_server import CatalogServer
from tests.support import catalog_samples as samples

MODEL = samples.MODEL


def publish_ranks(client: CatalogClient, name: str, version: int, ranks: range | list[int], world_size: int):
    info = None
    for r in ranks:
        info = client.publish(
            name=name, version=version, world_size=world_size, model=MODEL, source=samples.source(r, tp_size=2)
        )
    return info


# --- claims ---------------------------------------------------------------------------------------


def test_claim_is_idempotent_for_the_holder_and_refused_to_others(catalog_client: CatalogClient) -> None:
    first = catalog_client.claim(name="m", rank=3, agent_name="alice")
    assert (first.name, first.rank, first.agent_name) == ("m", 3, "alice") and first.claimed_at > 0
    assert catalog_client.claim(name="m", rank=3, agent_name="alice") == first
    with pytest.raises(RankTakenError) as err:
        catalog_client.claim(name="m", rank=3, agent_name="bob")
    assert "rank 3" in str(err.value) and "alice" in str(err.value)
    # Other ranks and other models are independent.
    assert catalog_client.claim(name="m", rank=4, agent_name="bob").agent_name == "bob"
    assert catalog_client.claim(name="other", rank=3, agent_name="bob").agent_name == "bob"


def test_takeover_and_release(catalog_client: CatalogClient) -> None:
    catalog_client.claim(name="m", rank=0, agent_name="alice")
    taken = catalog_client.claim(name="m", rank=0, agent_name="bob", takeover=True)
    assert taken.agent_name == "bob"
    catalog_client.release(name="m", rank=0, agent_name="alice")  # not the holder: no-op
    with pytest.raises(RankTakenError, match="bob"):
        catalog_client.claim(name="m", rank=0, agent_name="carol")
    catalog_client.release(name="m", rank=0, agent_name="bob")
    catalog_client.release(name="m", rank=0, agent_name="bob")  # idempotent
    catalog_client.release(name="never", rank=9, agent_name="x")
    assert catalog_client.claim(name="m", rank=0, agent_name="carol").agent_name == "carol"


# --- publish --------------------------------------------------------------------------------------


def test_ready_only_when_every_rank_published(catalog_client: CatalogClient) -> None:
    info = publish_ranks(catalog_client, "m", 1, [0, 2], world_size=3)
    assert info.state is VersionState.STAGING and info.published_ranks == (0, 2) and info.ready_at == 0
    assert info.world_size == 3 and info.model == MODEL and info.created_at > 0
    assert catalog_client.get_version(name="m", version=1) == info
    assert catalog_client.latest(name="m") is None
    ready = publish_ranks(catalog_client, "m", 1, [1], world_size=3)
    assert ready.state is VersionState.READY and ready.published_ranks == (0, 1, 2)
    assert ready.ready_at >= ready.created_at == info.created_at
    assert catalog_client.latest(name="m") == ready == catalog_client.get_version(name="m", version=1)


def test_sources_come_back_sorted_and_identical(catalog_client: CatalogClient) -> None:
    publish_ranks(catalog_client, "m", 7, [3, 0, 2, 1], world_size=4)
    sources = catalog_client.get_sources(name="m", version=7)
    assert [s.rank for s in sources] == [0, 1, 2, 3]
    assert sources == [samples.source(r, tp_size=2) for r in range(4)]


def test_same_agent_republishing_replaces_its_part(catalog_client: CatalogClient) -> None:
    publish_ranks(catalog_client, "m", 1, [0], world_size=2)
    new = samples.source(0, tp_size=2, metadata=b"re-registered")
    info = catalog_client.publish(name="m", version=1, world_size=2, model=MODEL, source=new)
    assert info.published_ranks == (0,) and info.state is VersionState.STAGING
    assert catalog_client.get_sources(name="m", version=1) == [new]
    publish_ranks(catalog_client, "m", 1, [1], world_size=2)
    again = publish_ranks(catalog_client, "m", 1, [1], world_size=2)  # READY stays READY
    assert again.state is VersionState.READY


def test_part_published_by_another_agent_is_refused(catalog_client: CatalogClient) -> None:
    publish_ranks(catalog_client, "m", 1, [0], world_size=2)
    intruder = samples.source(0, tp_size=2, agent="intruder")
    with pytest.raises(RankTakenError, match="agent-0"):
        catalog_client.publish(name="m", version=1, world_size=2, model=MODEL, source=intruder)
    assert catalog_client.get_sources(name="m", version=1) == [samples.source(0, tp_size=2)]


def test_rank_claimed_by_another_agent_cannot_publish(catalog_client: CatalogClient) -> None:
    catalog_client.claim(name="m", rank=1, agent_name="holder")
    with pytest.raises(RankTakenError) as err:
        publish_ranks(catalog_client, "m", 1, [1], world_size=2)
    assert "rank 1" in str(err.value) and "holder" in str(err.value)
    with pytest.raises(VersionNotFoundError):  # the refused part created nothing
        catalog_client.get_version(name="m", version=1)
    catalog_client.claim(name="m", rank=0, agent_name="agent-0")  # claimed by the publisher itself: fine
    assert publish_ranks(catalog_client, "m", 1, [0], world_size=2).published_ranks == (0,)


def test_conflicting_model_or_world_size_is_refused(catalog_client: CatalogClient) -> None:
    publish_ranks(catalog_client, "m", 1, [0], world_size=2)
    src = samples.source(1, tp_size=2)
    with pytest.raises(ConflictError) as err:
        catalog_client.publish(name="m", version=1, world_size=2, model=samples.model(hidden_size=128), source=src)
    assert "hidden_size" in str(err.value) and "64" in str(err.value) and "128" in str(err.value)
    with pytest.raises(ConflictError, match="world_size"):
        catalog_client.publish(name="m", version=1, world_size=4, model=MODEL, source=src)
    assert catalog_client.get_version(name="m", version=1).published_ranks == (0,)
    # Another version may change both.
    other = catalog_client.publish(name="m", version=2, world_size=4, model=samples.model(hidden_size=128), source=src)
    assert other.world_size == 4


def test_invalid_publish_arguments(catalog_client: CatalogClient) -> None:
    with pytest.raises(ConfigError, match="world_size"):
        publish_ranks(catalog_client, "m", 1, [2], world_size=2)
    with pytest.raises(ConfigError, match="world_size"):
        catalog_client.publish(name="m", version=1, world_size=0, model=MODEL, source=samples.source(0))
    with pytest.raises(ConfigError, match="name"):
        publish_ranks(catalog_client, "", 1, [0], world_size=1)
    with pytest.raises(ConfigError, match="version"):
        publish_ranks(catalog_client, "m", -1, [0], world_size=1)
    with pytest.raises(ConfigError):
        catalog_client.claim(name="m", rank=-1, agent_name="a")
    with pytest.raises(ConfigError):
        catalog_client.claim(name="m", rank="zero", agent_name="a")  # type: ignore[arg-type]
    assert catalog_client.list_versions() == []


def test_publishing_into_a_retired_version_is_refused(catalog_client: CatalogClient) -> None:
    publish_ranks(catalog_client, "m", 1, [0], world_size=2)
    assert catalog_client.retire(name="m", version=1) == [1]
    with pytest.raises(VersionRetiredError):
        publish_ranks(catalog_client, "m", 1, [1], world_size=2)
    with pytest.raises(VersionRetiredError):  # even with a conflicting model: RETIRED is checked first
        catalog_client.publish(
            name="m", version=1, world_size=2, model=samples.model(num_layers=4), source=samples.source(1, tp_size=2)
        )


def test_concurrent_parts_make_the_version_ready_exactly_once(catalog_client: CatalogClient) -> None:
    world = 16
    with futures.ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda r: publish_ranks(catalog_client, "m", 1, [r], world_size=world), range(world)))
    # Each store flips STAGING -> READY inside one critical section (the memory store's lock, one Lua
    # script in Redis) and answers from that same section, so only the last part's publish sees READY.
    assert sum(i.state is VersionState.READY for i in infos) == 1
    assert len({i.ready_at for i in infos if i.state is VersionState.READY}) == 1
    final = catalog_client.get_version(name="m", version=1)
    assert final.state is VersionState.READY and final.published_ranks == tuple(range(world))


def test_large_messages_pass_both_ways(catalog_client: CatalogClient) -> None:
    big = samples.source(0, metadata=b"\x5a" * (12 << 20))  # over gRPC's 4 MiB default, both directions
    catalog_client.publish(name="m", version=1, world_size=1, model=MODEL, source=big)
    assert catalog_client.get_sources(name="m", version=1) == [big]


# --- reads ----------------------------------------------------------------------------------------


def test_unknown_versions(catalog_client: CatalogClient) -> None:
    with pytest.raises(VersionNotFoundError, match="42"):
        catalog_client.get_version(name="m", version=42)
    with pytest.raises(VersionNotFoundError):
        catalog_client.get_sources(name="m", version=42)
    with pytest.raises(VersionNotFoundError):
        catalog_client.retire(name="m", version=42)
    assert catalog_client.latest(name="m") is None
    assert catalog_client.list_versions(name="m") == []


def test_latest_is_the_highest_version_in_the_state(catalog_client: CatalogClient) -> None:
    for v in (1, 3, 10):
        publish_ranks(catalog_client, "m", v, [0, 1], world_size=2)
    publish_ranks(catalog_client, "m", 12, [0], world_size=2)
    publish_ranks(catalog_client, "m", 2, [0], world_size=2)  # late and old: does not count as latest
    assert catalog_client.latest(name="m").version == 10
    assert catalog_client.latest(name="m", state=VersionState.STAGING).version == 12
    assert catalog_client.latest(name="m", state=VersionState.RETIRED) is None
    catalog_client.retire(name="m", version=10)
    assert catalog_client.latest(name="m").version == 3
    assert catalog_client.latest(name="m", state=VersionState.RETIRED).version == 10
    assert catalog_client.latest(name="other") is None


def test_list_versions_sorted_by_name_then_version(catalog_client: CatalogClient) -> None:
    for name, version in [("zeta", 2), ("alpha", 10), ("zeta", 1), ("alpha", 9), ("mid:with:colons", 1)]:
        publish_ranks(catalog_client, name, version, [0], world_size=1)
    everything = catalog_client.list_versions()
    assert [(i.name, i.version) for i in everything] == [
        ("alpha", 9),
        ("alpha", 10),
        ("mid:with:colons", 1),
        ("zeta", 1),
        ("zeta", 2),
    ]
    assert all(i.state is VersionState.READY for i in everything)
    assert [i.version for i in catalog_client.list_versions(name="zeta")] == [1, 2]
    assert catalog_client.list_versions(name="mid") == []


# --- retire ---------------------------------------------------------------------------------------


def test_retire_one_and_older(catalog_client: CatalogClient) -> None:
    for v in (1, 2, 3, 5):
        publish_ranks(catalog_client, "m", v, [0, 1], world_size=2)
    publish_ranks(catalog_client, "m", 4, [0], world_size=2)
    assert catalog_client.retire(name="m", version=2) == [2]
    assert catalog_client.retire(name="m", version=2) == []  # idempotent
    assert catalog_client.retire(name="m", version=4, and_older=True) == [1, 3, 4]
    states = {i.version: i.state for i in catalog_client.list_versions(name="m")}
    assert states == {1: "RETIRED", 2: "RETIRED", 3: "RETIRED", 4: "RETIRED", 5: "READY"}
    assert catalog_client.retire(name="m", version=4, and_older=True) == []
    # An unknown version with and_older still retires what is older.
    assert catalog_client.retire(name="m", version=100, and_older=True) == [5]
    assert catalog_client.retire(name="nothing", version=1, and_older=True) == []
    # Sources of a retired version stay readable (for inspection); readers check the state.
    assert len(catalog_client.get_sources(name="m", version=5)) == 2


# --- wait_ready -----------------------------------------------------------------------------------


def test_wait_ready_returns_once_the_last_rank_publishes(catalog_client: CatalogClient) -> None:
    publish_ranks(catalog_client, "m", 1, [0], world_size=2)
    timer = threading.Timer(0.2, publish_ranks, args=(catalog_client, "m", 1, [1], 2))
    timer.start()
    try:
        # A deadline far beyond the 0.2 s publish: READY (not a timeout error) shows the publish ended the wait.
        info = catalog_client.wait_ready(name="m", version=1, timeout_s=120.0, poll_s=0.02)
    finally:
        timer.join()
    assert info.state is VersionState.READY


def test_wait_ready_names_missing_ranks_on_timeout(catalog_client: CatalogClient) -> None:
    publish_ranks(catalog_client, "m", 1, [0, 1, 2, 5], world_size=8)
    # The version exists and stays STAGING, so only the deadline can end this wait: the error is that path.
    with pytest.raises(VersionNotReadyError) as err:
        catalog_client.wait_ready(name="m", version=1, timeout_s=0.3)
    assert err.value.missing_ranks == (3, 4, 6, 7) and err.value.version == 1
    assert "3-4, 6-7" in str(err.value) and "4/8" in str(err.value)


def test_wait_ready_for_a_version_that_never_appears_or_is_retired(catalog_client: CatalogClient) -> None:
    with pytest.raises(VersionNotFoundError, match="did not appear"):
        catalog_client.wait_ready(name="m", version=1, timeout_s=0.2)
    publish_ranks(catalog_client, "m", 1, [0], world_size=2)
    catalog_client.retire(name="m", version=1)
    with pytest.raises(VersionRetiredError):
        catalog_client.wait_ready(name="m", version=1, timeout_s=5.0)


def test_format_ranks() -> None:
    assert format_ranks([]) == ""
    assert format_ranks([7, 0, 1, 2, 5, 8]) == "0-2, 5, 7-8"


# --- availability and lifetime -----------------------------------------------------------------------


def test_ping(catalog_client: CatalogClient) -> None:
    catalog_client.ping()


def test_unreachable_catalog_fails_fast(closed_port: int) -> None:
    address = f"127.0.0.1:{closed_port}"
    # "Fast" without a stopwatch: under a long deadline, each call must fail because the connection was
    # refused (UNAVAILABLE), not because the deadline ran out (DEADLINE_EXCEEDED, after 120 s).
    with CatalogClient(address, timeout_s=120.0) as client:
        for call in (client.ping, lambda: client.get_version(name="m", version=1), lambda: client.list_versions()):
            with pytest.raises(CatalogUnavailableError, match=rf"{re.escape(address)}.*UNAVAILABLE"):
                call()


def test_stopped_server_and_closed_client(store_url: str) -> None:
    server = CatalogServer(store=store_url).start()
    client = CatalogClient(server.address, timeout_s=2.0)
    client.ping()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(CatalogUnavailableError):
        client.ping()
    client.close()
    client.close()
    with pytest.raises(CatalogError, match="closed"):
        client.ping()


def test_server_rejects_bad_configuration_before_binding() -> None:
    with pytest.raises(ConfigError, match="unknown catalog store"):
        CatalogServer(store="etcd://somewhere")
    with pytest.raises(ConfigError, match="unknown options"):
        CatalogServer(store="redis://127.0.0.1:6379/0?prefx=typo")
    with pytest.raises(ConfigError):
        CatalogServer(port=70000)
    with pytest.raises(ConfigError):
        CatalogClient("127.0.0.1:1", timeout_s=0)


def test_unreachable_redis_fails_at_start(closed_port: int) -> None:
    # A long store timeout: the start must fail on the refused connection, not by waiting out the timeout.
    server = CatalogServer(store=f"redis://127.0.0.1:{closed_port}/0?timeout_s=120", port=0)
    with pytest.raises(CatalogUnavailableError, match=rf"{closed_port}.*[Cc]onnection refused"):
        server.start()
    assert "not started" in repr(server)  # nothing was left serving


def test_address_and_context_manager() -> None:
    with CatalogServer() as server:
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert server.start() is server  # starting twice is harmless
        with pytest.raises(ConfigError, match="cannot bind"):  # no silent SO_REUSEPORT sharing
            CatalogServer(port=int(port)).start()
        with CatalogClient(server.address) as client:
            client.ping()
    assert server.wait(timeout=1.0)


def test_server_names_the_error_class_in_trailing_metadata(catalog_server: CatalogServer) -> None:
    with grpc.insecure_channel(catalog_server.address) as channel:
        stub = pb_grpc.CatalogStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetVersion(pb.GetVersionRequest(name="m", version=1), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert ("refit-error", "VersionNotFoundError") in tuple(err.value.trailing_metadata())
        with pytest.raises(grpc.RpcError) as err:
            stub.Latest(pb.LatestRequest(name="m"), timeout=5)  # state left UNSPECIFIED
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("refit-error", "ConfigError") in tuple(err.value.trailing_metadata())


@pytest.mark.redis
def test_redis_catalog_outlives_the_server(redis_url: str) -> None:
    with CatalogServer(store=redis_url).start() as server, CatalogClient(server.address) as client:
        publish_ranks(client, "m", 1, [0, 1], world_size=2)
        client.claim(name="m", rank=0, agent_name="agent-0")
    with CatalogServer(store=redis_url).start() as server, CatalogClient(server.address) as client:
        assert client.get_version(name="m", version=1).state is VersionState.READY
        assert client.get_sources(name="m", version=1) == [samples.source(r, tp_size=2) for r in range(2)]
        with pytest.raises(RankTakenError):
            client.claim(name="m", rank=0, agent_name="someone-else")


# --- status-code fallback (a server that sends no `refit-error` metadata) -------------------------------


class _BareServicer(pb_grpc.CatalogServicer):
    """Answers GetVersion with a fixed status and no metadata, like a proxy or a foreign server."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details

    def GetVersion(self, request, context):
        context.abort(self.code, self.details)


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, "no such version", VersionNotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, "rank 0 held", RankTakenError),
        (grpc.StatusCode.FAILED_PRECONDITION, "v1 is RETIRED", VersionRetiredError),
        (grpc.StatusCode.FAILED_PRECONDITION, "model differs", ConflictError),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad", ConfigError),
        (grpc.StatusCode.UNAVAILABLE, "store down", CatalogUnavailableError),
        (grpc.StatusCode.INTERNAL, "boom", CatalogError),
    ],
)
def test_status_codes_map_without_metadata(code: grpc.StatusCode, details: str, expected: type) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CatalogServicer_to_server(_BareServicer(code, details), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with CatalogClient(f"127.0.0.1:{port}", timeout_s=5.0) as client:
            with pytest.raises(expected) as err:
                client.get_version(name="m", version=1)
            assert type(err.value) is expected and details in str(err.value)
            with pytest.raises(CatalogError, match="UNIMPLEMENTED"):  # an RPC the servicer lacks
                client.latest(name="m")
    finally:
        server.stop(None)
