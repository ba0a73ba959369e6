"""The catalog over TLS (a server certificate, and mutual TLS) with tokens, on a real gRPC server.

Certificates come from a throwaway CA made in the test (`tests/support/tls_certs.py`).
"""

from __future__ import annotations

import pytest

from refit.catalog.client import CatalogClient
from refit.errors import AuthError, CatalogUnavailableError, ConfigError
from refit_server import CatalogServer
from tests.support import catalog_samples as samples
from tests.support.tls_certs import Certs, make_certs

TRAINER = "tls-trainer-3a9c1e7f5b"
READER = "tls-reader-6d2f8b4a0c"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls-other"), ca_name="another CA")


def test_server_tls_with_tokens(store_url, certs: Certs, other_ca: Certs) -> None:
    with CatalogServer(
        store=store_url,
        port=0,
        trainer_token=TRAINER,
        reader_token=READER,
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
    ) as server:
        assert "tls" in repr(server)
        with CatalogClient(server.address, timeout_s=5.0, token=TRAINER, tls_ca=str(certs.ca)) as trainer:
            info = trainer.publish(name="m", version=1, world_size=1, model=samples.MODEL, source=samples.source(0))
            assert info.state.value == "READY"
        with CatalogClient(server.address, timeout_s=5.0, token=READER, tls_ca=str(certs.ca)) as reader:
            assert [s.agent_metadata for s in reader.get_sources(name="m", version=1)] == [b"nixl\x00meta"]
            with pytest.raises(AuthError):
                reader.retire(name="m", version=1)
        # A plaintext client, or one trusting another CA, never completes a handshake.
        for client in (
            CatalogClient(server.address, timeout_s=2.0, token=READER),
            CatalogClient(server.address, timeout_s=2.0, token=READER, tls_ca=str(other_ca.ca)),
        ):
            with client, pytest.raises(CatalogUnavailableError):
                client.list_versions()


def test_mutual_tls(certs: Certs, other_ca: Certs) -> None:
    with CatalogServer(
        port=0,
        trainer_token=TRAINER,
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_ca=str(certs.ca),
    ) as server:
        ok = CatalogClient(
            server.address,
            timeout_s=5.0,
            token=TRAINER,
            tls_ca=str(certs.ca),
            tls_cert=str(certs.client_cert),
            tls_key=str(certs.client_key),
        )
        with ok:
            assert ok.list_versions() == []
        no_cert = CatalogClient(server.address, timeout_s=2.0, token=TRAINER, tls_ca=str(certs.ca))
        foreign = CatalogClient(
            server.address,
            timeout_s=2.0,
            token=TRAINER,
            tls_ca=str(certs.ca),
            tls_cert=str(other_ca.client_cert),
            tls_key=str(other_ca.client_key),
        )
        for client in (no_cert, foreign):
            with client, pytest.raises(CatalogUnavailableError):
                client.list_versions()


def test_tls_configuration_errors(certs: Certs, tmp_path) -> None:
    with pytest.raises(ConfigError, match="go together"):
        CatalogServer(tls_cert=str(certs.server_cert))
    with pytest.raises(ConfigError, match="go together"):
        CatalogServer(tls_ca=str(certs.ca))
    with pytest.raises(ConfigError, match="cannot read"):
        CatalogServer(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(certs.server_key))
    with pytest.raises(ConfigError, match="go together"):
        CatalogClient("127.0.0.1:1", tls_cert=str(certs.client_cert), tls_key=str(certs.client_key))
    with pytest.raises(ConfigError, match="cannot read"):
        CatalogClient("127.0.0.1:1", tls_ca=str(tmp_path / "missing.pem"))
