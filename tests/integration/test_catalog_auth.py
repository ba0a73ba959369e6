"""Catalog authentication over a real gRPC server, memory store and real Redis: a trainer token that
may do everything, a reader token that may only read, and refusals (AuthError) that change nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import grpc
import pytest

from refit.catalog.client import TOKEN_ENV, CatalogClient
from refit.errors import AuthError, ConfigError, RankTakenError, VersionNotFoundError
from refit.proto import catalog_pb2 as pb
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit.types import VersionState
from refit_server import CatalogServer
from tests.support import catalog_samples as samples

TRAINER = "trainer-secret-5f1c9a0b7d"
READER = "reader-secret-8e2d4c6a1f"
WRONG = "not-the-token-0000000000"
MODEL = samples.MODEL


@pytest.fixture
def server(store_url: str) -> Iterator[CatalogServer]:
    with CatalogServer(store=store_url, port=0, max_workers=4, trainer_token=TRAINER, reader_token=READER) as s:
        yield s


@pytest.fixture
def trainer(server: CatalogServer) -> Iterator[CatalogClient]:
    with CatalogClient(server.address, timeout_s=5.0, token=TRAINER) as c:
        yield c


def _seed(trainer: CatalogClient) -> None:
    """m v1 READY (2 ranks), m v2 STAGING (rank 0 only); rank 0 claimed by agent-0."""
    trainer.claim(name="m", rank=0, agent_name="agent-0")
    for r in (0, 1):
        trainer.publish(name="m", version=1, world_size=2, model=MODEL, source=samples.source(r, tp_size=2))
    trainer.publish(name="m", version=2, world_size=2, model=MODEL, source=samples.source(0, tp_size=2))


def _snapshot(trainer: CatalogClient) -> list:
    infos = trainer.list_versions()
    return [(i, trainer.get_sources(name=i.name, version=i.version)) for i in infos]


WRITES: dict[str, Callable[[CatalogClient], object]] = {
    "claim": lambda c: c.claim(name="m", rank=0, agent_name="intruder", takeover=True),
    "claim-new": lambda c: c.claim(name="m", rank=1, agent_name="intruder"),
    "release": lambda c: c.release(name="m", rank=0, agent_name="agent-0"),
    "publish": lambda c: c.publish(
        name="m", version=2, world_size=2, model=MODEL, source=samples.source(1, tp_size=2, agent="intruder")
    ),
    "publish-new": lambda c: c.publish(
        name="m", version=9, world_size=1, model=MODEL, source=samples.source(0, agent="intruder")
    ),
    "retire": lambda c: c.retire(name="m", version=2, and_older=True),
}
READS: dict[str, Callable[[CatalogClient], object]] = {
    "get": lambda c: c.get_version(name="m", version=1),
    "state": lambda c: c.version_state(name="m", version=1),
    "state-later": lambda c: c.version_state_later(name="m", version=1)(),
    "latest": lambda c: c.latest(name="m"),
    "list": lambda c: c.list_versions(),
    "sources": lambda c: c.get_sources(name="m", version=1),
    "resolve": lambda c: c.resolve(name="m"),
    "wait": lambda c: c.wait_ready(name="m", version=1, timeout_s=1.0),
}


def _assert_unchanged(trainer: CatalogClient, before: list) -> None:
    assert _snapshot(trainer) == before
    # The claim on rank 0 is still agent-0's, and rank 1 is still free of any claim by "intruder".
    with pytest.raises(RankTakenError, match="agent-0"):
        trainer.claim(name="m", rank=0, agent_name="someone-else")
    assert trainer.claim(name="m", rank=1, agent_name="agent-1").agent_name == "agent-1"


@pytest.mark.parametrize("who", ["no-token", "wrong-token", "reader-token"])
def test_writes_are_refused_and_change_nothing(server, trainer, who, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    _seed(trainer)
    before = _snapshot(trainer)
    token = {"no-token": None, "wrong-token": WRONG, "reader-token": READER}[who]
    with CatalogClient(server.address, timeout_s=5.0, token=token) as bad:
        for op, call in WRITES.items():
            with pytest.raises(AuthError) as info:
                call(bad)
            assert info.value.permission_denied is (who == "reader-token"), op
    _assert_unchanged(trainer, before)


@pytest.mark.parametrize("who", ["no-token", "wrong-token"])
def test_reads_need_a_valid_token(server, trainer, who, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    _seed(trainer)
    with CatalogClient(server.address, timeout_s=5.0, token=None if who == "no-token" else WRONG) as bad:
        bad.ping()  # liveness stays open: it tells nothing about the catalog
        for op, call in READS.items():
            with pytest.raises(AuthError, match="UNAUTHENTICATED") as info:
                call(bad)
            assert not info.value.permission_denied, op


def test_reader_reads_everything_and_trainer_does_everything(server, trainer) -> None:
    _seed(trainer)
    with CatalogClient(server.address, timeout_s=5.0, token=READER) as reader:
        for call in READS.values():
            call(reader)
        # NIXL agent metadata reaches the authenticated reader as published.
        assert [s.agent_metadata for s in reader.get_sources(name="m", version=1)] == [b"nixl\x00meta"] * 2
        assert reader.resolve(name="m").info.version == 1
    for call in READS.values():
        call(trainer)
    trainer.publish(name="m", version=2, world_size=2, model=MODEL, source=samples.source(1, tp_size=2))
    assert trainer.version_state(name="m", version=2) is VersionState.READY
    assert trainer.retire(name="m", version=1) == [1]
    trainer.release(name="m", rank=0, agent_name="agent-0")
    assert trainer.claim(name="m", rank=0, agent_name="agent-new").agent_name == "agent-new"


def test_raw_metadata_forms(server, trainer) -> None:
    """What reaches the server, not what our client sends: scheme, case, and duplicated headers."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CatalogStub(channel)
        request = pb.ListVersionsRequest()
        assert stub.ListVersions(request, metadata=(("authorization", f"bearer {READER}"),), timeout=5).versions == []
        for metadata in (
            (("authorization", READER),),  # no scheme
            (("authorization", f"Basic {READER}"),),
            (("authorization", f"Bearer {READER}"), ("authorization", f"Bearer {READER}")),
            (("authorization", f"Bearer {READER}x"),),
            (("authorization", f"Bearer {READER[:-1]}"),),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.ListVersions(request, metadata=metadata, timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert READER not in (info.value.details() or "")


def test_env_var_is_the_default_token(server, trainer, monkeypatch) -> None:
    _seed(trainer)
    monkeypatch.setenv(TOKEN_ENV, READER)
    with CatalogClient(server.address, timeout_s=5.0) as c:
        assert c.get_version(name="m", version=1).state is VersionState.READY
        with pytest.raises(AuthError) as info:
            c.retire(name="m", version=1)
        assert info.value.permission_denied
    # An explicit token wins over the environment.
    with CatalogClient(server.address, timeout_s=5.0, token=TRAINER) as c:
        assert c.retire(name="m", version=1) == [1]
    monkeypatch.setenv(TOKEN_ENV, WRONG)
    with CatalogClient(server.address, timeout_s=5.0) as c, pytest.raises(AuthError):
        c.latest(name="m")
    monkeypatch.setenv(TOKEN_ENV, "two words")
    with pytest.raises(ConfigError, match=TOKEN_ENV) as bad:
        CatalogClient(server.address)
    assert "two words" not in str(bad.value)


def test_tokens_never_appear_in_logs_reprs_or_errors(store_url, caplog, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with CatalogServer(store=store_url, port=0, trainer_token=TRAINER, reader_token=READER) as server:
        seen.append(repr(server))
        with CatalogClient(server.address, token=TRAINER) as trainer:
            seen.append(repr(trainer))
            _seed(trainer)
        for token in (READER, WRONG, None):
            with CatalogClient(server.address, token=token) as c:
                seen.append(repr(c))
                for call in (*WRITES.values(), *READS.values()):
                    try:
                        call(c)
                    except (AuthError, VersionNotFoundError) as exc:
                        seen.append(str(exc))
    assert any("refused" in r.message for r in caplog.records)  # refusals are logged, by peer
    text = caplog.text + "\n".join(seen)
    for token in (TRAINER, READER, WRONG):
        assert token not in text
    assert "token=***" in repr(CatalogClient("127.0.0.1:1", token=READER))


def test_bad_token_configuration_is_refused_before_binding() -> None:
    with pytest.raises(ConfigError, match="needs a trainer_token"):
        CatalogServer(reader_token=READER)
    with pytest.raises(ConfigError, match="differ"):
        CatalogServer(trainer_token=TRAINER, reader_token=TRAINER)
    with pytest.raises(ConfigError) as info:
        CatalogServer(trainer_token="has space")
    assert "has space" not in str(info.value)
    with pytest.raises(ConfigError):
        CatalogServer(trainer_token="")


def test_open_catalog_warns_on_a_non_loopback_host(caplog) -> None:
    caplog.set_level(logging.WARNING)
    with (
        CatalogServer(host="0.0.0.0", port=0) as server,
        CatalogClient(server.address.replace("0.0.0.0", "127.0.0.1")) as c,
    ):
        assert c.list_versions() == []  # no tokens: today's open behaviour
    assert any("no tokens" in r.message for r in caplog.records)
    caplog.clear()
    with CatalogServer(port=0):
        pass
    assert not any("no tokens" in r.message for r in caplog.records)
