"""The vLLM driver's catalog lookup and `refit-fleet` against a catalog served over mutual TLS with tokens.

A real gRPC catalog (certificates from a throwaway CA made here, `tests/support/tls_certs.py`); the
servers the fleet drives are the HTTP stand-in of `tests/unit/test_fleet.py` (real vLLM servers run in
`test_vllm_fleet.py`): what is checked here is the fleet's own lookup over TLS and that the TLS files
reach each server's `init_info` (the backend passes them to its `Receiver`, as `Receiver(tls_ca=...)`
in `test_refit_tls.py`). The options carry the names `Publisher`, `Receiver` and `refit-catalog` use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from refit.catalog.client import CatalogClient
from refit.errors import CatalogUnavailableError, ConfigError
from refit.vllm.fleet import Fleet
from refit.vllm.flow import RefitPlan, resolve_version
from refit_server import CatalogServer
from tests.support import catalog_samples as samples
from tests.support.tls_certs import Certs, make_certs
from tests.unit.test_fleet import FakeVLLM

TRAINER = "fleet-tls-trainer-4e8a1c6b2d"
READER = "fleet-tls-reader-7f3d9b5e1a"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("fleet-tls"))


@pytest.fixture(scope="module")
def catalog(certs: Certs) -> Iterator[str]:
    """A mutual-TLS catalog with tokens holding versions 1 and 2 (both READY) of model "m"."""
    with CatalogServer(
        store="memory", port=0, trainer_token=TRAINER, reader_token=READER,
        tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tls_ca=str(certs.ca),
    ) as server:  # fmt: skip
        with CatalogClient(server.address, timeout_s=5.0, token=TRAINER, **tls(certs)) as client:
            for version in (1, 2):
                info = client.publish(name="m", version=version, world_size=1, model=samples.MODEL,
                                      source=samples.source(0))  # fmt: skip
                assert info.state.value == "READY"
        yield server.address


@pytest.fixture
def server() -> Iterator[FakeVLLM]:
    s = FakeVLLM()
    yield s
    s.close()


def tls(certs: Certs) -> dict[str, str]:
    return {"tls_ca": str(certs.ca), "tls_cert": str(certs.client_cert), "tls_key": str(certs.client_key)}


def init_infos(server: FakeVLLM) -> list[dict]:
    return [body["init_info"] for path, _, body in server.requests if path == "/init_weight_transfer_engine"]


def test_the_lookup_resolves_over_mutual_tls_and_a_client_without_it_gets_nothing(catalog: str, certs: Certs) -> None:
    assert resolve_version(catalog=catalog, name="m", version=None, timeout_s=5.0, token=READER, **tls(certs)) == 2
    assert resolve_version(catalog=catalog, name="m", version=1, timeout_s=5.0, token=READER, **tls(certs)) == 1
    with pytest.raises(CatalogUnavailableError):  # plaintext: no handshake
        resolve_version(catalog=catalog, name="m", version=None, timeout_s=5.0, catalog_timeout_s=2.0, token=READER)
    with pytest.raises(CatalogUnavailableError):  # trusts the CA but shows no client certificate
        resolve_version(catalog=catalog, name="m", version=None, timeout_s=5.0, catalog_timeout_s=2.0, token=READER,
                        tls_ca=str(certs.ca))  # fmt: skip


def test_a_fleet_resolves_over_tls_and_sends_the_files_to_each_server(
    catalog: str, certs: Certs, server: FakeVLLM
) -> None:
    fleet = Fleet(catalog=catalog, name="m", servers=[server.url], timeout_s=30.0, token=READER, **tls(certs))
    (result,) = fleet.refit()
    assert result.error is None and result.version == 2 and fleet.current == 2, result
    (info,) = init_infos(server)
    assert {k: info[k] for k in ("tls_ca", "tls_cert", "tls_key")} == tls(certs) and info["token"] == READER
    assert server.weight_version == "2"

    # Without TLS the fleet cannot even look the version up: nothing reaches the server.
    plain = FakeVLLM()
    try:
        with pytest.raises(CatalogUnavailableError):
            Fleet(catalog=catalog, name="m", servers=[plain.url], timeout_s=2.0, token=READER).refit()
        assert plain.requests == []
    finally:
        plain.close()


def test_refit_fleet_takes_the_tls_options(catalog: str, certs: Certs, server: FakeVLLM, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(READER)
    command = [sys.executable, "-m", "refit.vllm.fleet", "--catalog", catalog, "--name", "m", "--server", server.url,
               "--token-file", str(token_file), "--tls-ca", str(certs.ca),
               "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert json.loads(line)["version"] == 2 and json.loads(line)["error"] is None  # the newest READY one
    (info,) = init_infos(server)
    assert {k: info[k] for k in ("tls_ca", "tls_cert", "tls_key")} == tls(certs)
    assert READER not in done.stderr  # the token is never logged

    # A certificate without its key is refused before any call, naming the options.
    half = [c for c in command if c not in ("--tls-key", str(certs.client_key))]
    done = subprocess.run(half, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and "tls_cert and tls_key go together" in done.stderr
    assert len(init_infos(server)) == 1


def test_tls_options_are_checked_where_they_are_given(certs: Certs) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        Fleet(catalog="c:1", tls_cert=str(certs.client_cert), tls_key=str(certs.client_key))  # no CA
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        RefitPlan(catalog="c:1", tls_ca=str(certs.ca), tls_cert=str(certs.client_cert))
