"""A whole refit through a catalog served over TLS with tokens: Megatron trainer ranks (gloo processes)
publish with `Publisher(tls_ca=...)`, a `Receiver(tls_ca=...)` pulls, and the engine matches the HF
model bit for bit. A Receiver that does not trust the catalog's CA never gets a version.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from refit import Receiver
from refit.engines import HFEngine
from refit.errors import CatalogUnavailableError
from refit.vllm.values import init_info
from refit_server import CatalogServer
from tests.support import hf_models as hm
from tests.support.refit_harness import assert_same_logits, assert_same_weights
from tests.support.tls_certs import Certs, make_certs

TRAINER = "tls-e2e-trainer-5c2a9d1f3e"
READER = "tls-e2e-reader-8b4e6a0c2d"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls-refit"))


@pytest.fixture(scope="module")
def catalog(certs: Certs) -> Iterator[str]:
    """Overrides conftest's open catalog: the `trainer` fixture's models live in this one."""
    with CatalogServer(
        store="memory", port=0, trainer_token=TRAINER, reader_token=READER,
        tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
    ) as server:  # fmt: skip
        yield server.address


def test_refit_over_tls_is_bit_exact(trainer, catalog, certs: Certs) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    results = t.cluster.run("tests.support.auth_ops:publish", key=t.name, catalog=catalog, version=1, token=TRAINER,
                            vocab_size=t.vocab, tls_ca=str(certs.ca))  # fmt: skip
    assert "READY" in {r["state"] for r in results}

    plaintext = Receiver(catalog=catalog, engine=HFEngine(hm.build_hf_model(hm.LLAMA_GQA, seed=5)), name=t.name,
                         token=READER)  # fmt: skip
    with plaintext, pytest.raises(CatalogUnavailableError):
        plaintext.update_weights(timeout_s=5.0)

    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=99)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, token=READER,
                  tls_ca=str(certs.ca)) as rcv:  # fmt: skip
        assert rcv.update_weights().version == 1
    assert_same_weights(engine_model, t.hf)
    assert_same_logits(engine_model, t.hf)


def test_vllm_init_info_carries_the_tls_files() -> None:
    info = init_info(catalog="h:1", tls_ca="/ca.pem", tls_cert="/c.pem", tls_key="/k.pem")
    assert (info["tls_ca"], info["tls_cert"], info["tls_key"]) == ("/ca.pem", "/c.pem", "/k.pem")
    assert "tls_ca" not in init_info(catalog="h:1")
