"""`GetState` end to end: CatalogClient.version_state -> real gRPC server -> memory store or a real Redis.

The receiver's READY re-check after every pull asks only for a version's state. Every test that takes
`catalog_client` runs over both stores; arguments the catalog would refuse fail in the client, before
any round trip.
"""

from __future__ import annotations

import grpc
import pytest
import redis

from refit.catalog import wire
from refit.catalog.client import CatalogClient
from refit.errors import CatalogError, CatalogUnavailableError, ConfigError, VersionNotFoundError
from refit.proto import catalog_pb2 as pb
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit.types import VersionState
from refit_server import CatalogServer
from tests.support import catalog_samples as samples

WORLD = 2


def publish(client: CatalogClient, version: int, ranks: range | list[int], *, name: str = "m") -> None:
    for r in ranks:
        client.publish(
            name=name, version=version, world_size=WORLD, model=samples.MODEL, source=samples.source(r, tp_size=WORLD)
        )


def test_state_follows_the_version_through_its_life(catalog_client: CatalogClient) -> None:
    publish(catalog_client, 1, [1])
    assert catalog_client.version_state(name="m", version=1) is VersionState.STAGING
    publish(catalog_client, 1, [0])
    assert catalog_client.version_state(name="m", version=1) is VersionState.READY
    # The same agent republishing its part into a READY version leaves it READY.
    publish(catalog_client, 1, [0])
    assert catalog_client.version_state(name="m", version=1) is VersionState.READY
    catalog_client.retire(name="m", version=1)
    assert catalog_client.version_state(name="m", version=1) is VersionState.RETIRED


def test_states_of_several_versions_and_models(catalog_client: CatalogClient) -> None:
    publish(catalog_client, 1, range(WORLD))
    publish(catalog_client, 2, range(WORLD))
    publish(catalog_client, 3, [0])  # STAGING
    publish(catalog_client, 4, range(WORLD))
    publish(catalog_client, 1, [0], name="other")  # same number, another model: STAGING
    catalog_client.retire(name="m", version=3, and_older=True)  # 1, 2 and the STAGING 3
    expected = {
        ("m", 1): VersionState.RETIRED,
        ("m", 2): VersionState.RETIRED,
        ("m", 3): VersionState.RETIRED,
        ("m", 4): VersionState.READY,
        ("other", 1): VersionState.STAGING,
    }
    for (name, version), state in expected.items():
        assert catalog_client.version_state(name=name, version=version) is state, (name, version)
        # The full record the catalog holds agrees.
        assert catalog_client.get_version(name=name, version=version).state is state, (name, version)


def test_unknown_name_or_version(catalog_client: CatalogClient) -> None:
    with pytest.raises(VersionNotFoundError, match="'nobody' has no version 1"):
        catalog_client.version_state(name="nobody", version=1)
    publish(catalog_client, 1, range(WORLD))
    with pytest.raises(VersionNotFoundError, match="'m' has no version 2"):
        catalog_client.version_state(name="m", version=2)
    with pytest.raises(VersionNotFoundError, match="'m' has no version 0"):
        catalog_client.version_state(name="m", version=0)
    with pytest.raises(VersionNotFoundError, match="'m:' has no version 1"):  # no aliasing through ':'
        catalog_client.version_state(name="m:", version=1)


def test_state_sent_now_answered_later_agrees_and_raises_alike(catalog_client: CatalogClient) -> None:
    # The receiver's READY re-check: sent once the last byte has landed, answered after the install.
    publish(catalog_client, 1, range(WORLD))
    answers = [catalog_client.version_state_later(name="m", version=1) for _ in range(3)]  # queued on one thread
    catalog_client.retire(name="m", version=1)  # after they were sent: they may see either state
    assert all(answer() in (VersionState.READY, VersionState.RETIRED) for answer in answers)
    assert catalog_client.version_state_later(name="m", version=1)() is VersionState.RETIRED
    later = catalog_client.version_state_later(name="m", version=2)
    with pytest.raises(VersionNotFoundError, match="'m' has no version 2"):
        later()


# case -> (arguments, what the error says)
BAD_ARGS: dict[str, tuple[dict[str, object], str]] = {
    "empty name": ({"name": "", "version": 1}, "model name must be a non-empty str"),
    "name not a str": ({"name": b"m", "version": 1}, "model name must be a non-empty str"),
    "name None": ({"name": None, "version": 1}, "model name must be a non-empty str"),
    "negative version": ({"name": "m", "version": -1}, "version must be an int >= 0, got -1"),
    "version a str": ({"name": "m", "version": "1"}, "version must be an int >= 0, got '1'"),
    "version a float": ({"name": "m", "version": 1.0}, "version must be an int >= 0, got 1.0"),
    "version a bool": ({"name": "m", "version": True}, "version must be an int >= 0, got True"),
    "version beyond int64": ({"name": "m", "version": 2**63}, "GetState: .*out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_arguments_fail_before_any_rpc(closed_port: int, case: str) -> None:
    # Nothing listens at this address: any call that reached the network would raise
    # CatalogUnavailableError, so a ConfigError here was raised before a round trip.
    with CatalogClient(f"127.0.0.1:{closed_port}", timeout_s=5.0) as client:
        arguments, message = BAD_ARGS[case]
        with pytest.raises(ConfigError, match=message):
            client.version_state(**arguments)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=message):
            client.version_state_later(**arguments)  # type: ignore[arg-type]
        with pytest.raises(CatalogUnavailableError, match="GetState"):
            client.version_state(name="m", version=1)
        with pytest.raises(CatalogUnavailableError, match="GetState"):
            client.version_state_later(name="m", version=1)()


def test_server_refuses_bad_requests_itself(catalog_server: CatalogServer) -> None:
    # What another client could send: the server validates too and names the refit error class.
    with grpc.insecure_channel(catalog_server.address) as channel:
        stub = pb_grpc.CatalogStub(channel)
        for request, message in (
            (pb.GetStateRequest(name="", version=1), "model name must be non-empty"),
            (pb.GetStateRequest(name="m", version=-1), "version must be >= 0"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetState(request, timeout=5.0)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert message in caught.value.details()
            assert (wire.ERROR_METADATA_KEY, "ConfigError") in caught.value.trailing_metadata()


def test_closed_client_refuses(catalog_server: CatalogServer) -> None:
    client = CatalogClient(catalog_server.address, timeout_s=5.0)
    client.close()
    with pytest.raises(CatalogError, match="is closed"):
        client.version_state(name="m", version=1)
    with pytest.raises(CatalogError, match="is closed"):
        client.version_state_later(name="m", version=1)


@pytest.mark.redis
def test_redis_state_is_read_without_the_version_record(redis_url: str) -> None:
    """The state alone is read: a version whose model bytes are unreadable still answers."""
    with CatalogServer(store=redis_url, port=0).start() as server, CatalogClient(server.address) as client:
        publish(client, 1, range(WORLD))
        url, prefix = redis_url.split("?prefix=")
        key = f"{prefix}:m:m:v:1"  # the key layout of refit_server/stores/lua.py
        with redis.Redis.from_url(url) as raw:
            raw.hset(key, "model", b"\xff not a ModelMeta")
        with pytest.raises(ConfigError, match="corrupt"):
            client.get_version(name="m", version=1)
        assert client.version_state(name="m", version=1) is VersionState.READY
        client.retire(name="m", version=1)
        assert client.version_state(name="m", version=1) is VersionState.RETIRED
