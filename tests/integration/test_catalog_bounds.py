"""Bounds at the catalog's boundary, end to end: a real gRPC server (memory store and a real Redis) started
with small `CatalogLimits`, sent every kind of out-of-bounds request through a raw stub (the client would
refuse some of them itself). Each is INVALID_ARGUMENT naming the field, and the catalog is unchanged.
Then the other direction: records that break the bounds reaching a client (written straight into Redis,
or answered by a foreign gRPC server) are refused by the client before anyone plans a read from them.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from refit.catalog import wire
from refit.catalog.client import CatalogClient
from refit.errors import ConfigError
from refit.proto import catalog_pb2 as pb
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit.types import VersionState
from refit_server import CatalogServer
from tests.support import catalog_samples as samples
from tests.support.catalog_mutations import PUBLISH_MUTATIONS, SMALL_LIMITS, publish_request

WORLD = 2


@pytest.fixture
def bounded(store_url: str) -> Iterator[tuple[CatalogServer, grpc.Channel]]:
    with (
        CatalogServer(store=store_url, port=0, max_workers=4, limits=SMALL_LIMITS).start() as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield server, channel


def _snapshot(client: CatalogClient) -> tuple[object, ...]:
    return tuple(client.list_versions()), tuple(client.get_sources(name="m", version=1))


def _refused(call: grpc.UnaryUnaryMultiCallable, request: object) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=5.0)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


def _good(rank: int) -> pb.PublishRequest:
    return publish_request("m", 1, WORLD, samples.MODEL, samples.source(rank, tp_size=WORLD))


def test_every_out_of_bounds_publish_is_refused_naming_its_field(bounded) -> None:
    server, channel = bounded
    stub = pb_grpc.CatalogStub(channel)
    with CatalogClient(server.address, timeout_s=5.0) as client:
        stub.Publish(_good(1), timeout=5.0)  # version 1 exists, STAGING, rank 1 published
        before = _snapshot(client)
        for label, (field, mutate) in PUBLISH_MUTATIONS.items():
            request = _good(0)
            mutate(request)
            details = _refused(stub.Publish, request)
            assert field in details, f"{label}: {details!r} does not name {field!r}"
            assert len(details) < 1_000, f"{label}: the refusal echoes the input"
        assert _snapshot(client) == before  # nothing reached the store
        assert client.version_state(name="m", version=1) is VersionState.STAGING
        stub.Publish(_good(0), timeout=5.0)  # the valid part still completes the version
        assert client.version_state(name="m", version=1) is VersionState.READY


def test_other_rpcs_are_bounded_too(bounded) -> None:
    server, channel = bounded
    stub = pb_grpc.CatalogStub(channel)
    cases = [
        (stub.Claim, pb.ClaimRequest(name="m", rank=64, agent_name="a"), "rank"),
        (stub.Claim, pb.ClaimRequest(name="m", rank=0, agent_name="a" * 33), "agent_name"),
        (stub.Claim, pb.ClaimRequest(name="m" * 65, rank=0, agent_name="a"), "model name"),
        (stub.Release, pb.ReleaseRequest(name="m", rank=-1, agent_name="a"), "rank"),
        (stub.GetVersion, pb.GetVersionRequest(name="m", version=2**53), "version"),
        (stub.GetState, pb.GetStateRequest(name="", version=1), "model name"),
        (stub.Latest, pb.LatestRequest(name="m", state=0), "VERSION_STATE_UNSPECIFIED"),
        (stub.Latest, pb.LatestRequest(name="m", state=42), "version state 42"),
        (stub.ListVersions, pb.ListVersionsRequest(name="n" * 65), "model name"),
        (stub.GetSources, pb.GetSourcesRequest(name="m", version=-5), "version"),
        (stub.Resolve, pb.ResolveRequest(name="m", known_layout="k" * 65), "known_layout"),
        (stub.Resolve, pb.ResolveRequest(name="m", version=-1), "version"),
        (stub.Retire, pb.RetireRequest(name="m", version=2**62, and_older=True), "version"),
    ]
    for call, request, field in cases:
        assert field in _refused(call, request)
    with CatalogClient(server.address, timeout_s=5.0) as client:
        assert client.list_versions() == []


def test_malformed_and_oversized_messages_are_answered(bounded) -> None:
    server, channel = bounded
    raw = channel.unary_unary("/refit.v1.Catalog/Publish")  # bytes in, bytes out: no client-side parsing
    details = _refused(raw, b"\xff\xff\xff\xff")
    assert "not a valid PublishRequest" in details
    request = _good(0)
    request.source.agent_metadata = b"x" * (SMALL_LIMITS.max_message_bytes + 1)
    with pytest.raises(grpc.RpcError) as caught:
        raw(request.SerializeToString(), timeout=5.0)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    with CatalogClient(server.address, timeout_s=5.0) as client:
        client.ping()  # still serving
        assert client.list_versions() == []


def _bad_record() -> pb.SourceRecord:
    """A record whose first descriptor's bytes start 1 GiB into a 16 KiB region."""
    record = wire.source_to_proto(samples.source(0))
    record.tensors[0].byte_offset = 2**30
    return record


@pytest.mark.redis
def test_a_stored_record_outside_its_region_is_never_served(redis_url: str) -> None:
    """A record written into Redis behind the catalog's back reaches no reader's planner: the catalog
    rebuilds every record it reads, and the record's own check refuses it."""
    import redis

    with CatalogServer(store=redis_url, port=0).start() as server, CatalogClient(server.address) as client:
        client.publish(name="m", version=1, world_size=1, model=samples.MODEL, source=samples.source(0))
        assert client.resolve(name="m").info.state is VersionState.READY
        prefix = redis_url.split("prefix=")[1]
        raw = redis.Redis.from_url(redis_url.split("?")[0])
        try:
            raw.hset(f"{prefix}:m:m:v:1:sources", "0", _bad_record().SerializeToString())
        finally:
            raw.close()
        # The reply cached before the write (the catalog did not make it, so the model's generation
        # did not move) is the record as published; any reply rebuilt from Redis is refused.
        assert client.resolve(name="m").sources == (samples.source(0),)
        with pytest.raises(ConfigError, match=r"linear_fc1.weight runs past the end of region 0"):
            client.resolve(name="m", ranks=[0])
        with pytest.raises(ConfigError, match=r"linear_fc1.weight runs past the end of region 0"):
            client.get_sources(name="m", version=1)


class _ForeignCatalog(pb_grpc.CatalogServicer):
    """A catalog that answers Resolve with whatever it is given: a broken or malicious one."""

    def __init__(self, response: pb.ResolveResponse) -> None:
        self.response = response

    def Resolve(self, request, context):
        return self.response


def _info(world_size: int) -> pb.VersionInfo:
    return pb.VersionInfo(
        name="m",
        version=1,
        state=pb.VERSION_STATE_READY,
        world_size=world_size,
        published_ranks=list(range(world_size)),
    )


@pytest.mark.parametrize(
    ("response", "match"),
    [
        (pb.ResolveResponse(info=_info(1), sources=[_bad_record()]), r"sources\[0\]\.tensors\[0\].*past the end"),
        (
            pb.ResolveResponse(info=_info(1), sources=[wire.source_to_proto(samples.source(0))] * 2),
            r"sources: 2 entries, over the limit of 1",
        ),
        (pb.ResolveResponse(info=_info(1), sources=[wire.source_to_proto(samples.source(3))]), "outside world_size"),
        (pb.ResolveResponse(info=_info(10**6), sources=[]), r"info\.world_size must be <= 65536"),
    ],
    ids=["range outside region", "too many sources", "rank outside world", "huge world"],
)
def test_client_refuses_what_a_foreign_catalog_answers(response: pb.ResolveResponse, match: str) -> None:
    response.info.model.CopyFrom(wire.model_to_proto(samples.MODEL))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CatalogServicer_to_server(_ForeignCatalog(response), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with CatalogClient(f"127.0.0.1:{port}", timeout_s=5.0) as client, pytest.raises(ConfigError, match=match):
            client.resolve(name="m")
    finally:
        server.stop(None)
