"""A whole refit through a catalog that checks tokens: Megatron trainer ranks (gloo processes) publish
with the trainer token, a Receiver pulls with the reader token, and the engine matches the HF model
bit for bit. A reader token cannot claim a trainer rank; no token cannot even resolve.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from refit import Receiver
from refit.catalog.client import TOKEN_ENV
from refit.engines import HFEngine
from refit.errors import AuthError
from refit_server import CatalogServer
from tests.support import hf_models as hm
from tests.support.refit_harness import assert_same_logits, assert_same_weights

TRAINER = "trainer-e2e-7c3f9b21a4"
READER = "reader-e2e-2b8e5d07c6"
OPS = "tests.support.auth_ops"


@pytest.fixture(scope="module")
def catalog() -> Iterator[str]:
    """Overrides conftest's open catalog: the `trainer` fixture's models live in this one."""
    with CatalogServer(store="memory", port=0, trainer_token=TRAINER, reader_token=READER) as server:
        yield server.address


def test_refit_with_tokens_is_bit_exact(trainer, catalog, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    # A reader token cannot claim a trainer rank: every rank's Publisher is refused.
    refused = t.cluster.run(f"{OPS}:publish_refused", key=t.name, catalog=catalog, token=READER)
    assert set(refused) == {"AuthError"}

    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=99)
    results = t.cluster.run(f"{OPS}:publish", key=t.name, catalog=catalog, version=1, token=TRAINER, vocab_size=t.vocab)
    assert "READY" in {r["state"] for r in results}

    stranger = Receiver(catalog=catalog, engine=HFEngine(hm.build_hf_model(hm.LLAMA_GQA, seed=5)), name=t.name)
    with stranger, pytest.raises(AuthError):
        stranger.update_weights(timeout_s=10.0)

    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, token=READER) as rcv:
        assert rcv.update_weights().version == 1
    assert_same_weights(engine_model, t.hf)
    assert_same_logits(engine_model, t.hf)

    # The environment variable is the default credential of a Receiver too.
    monkeypatch.setenv(TOKEN_ENV, READER)
    v2 = t.step(seed=2)
    t.cluster.run("tests.support.refit_ops:invalidate", name=t.name)
    t.cluster.run(f"{OPS}:publish", key=t.name, catalog=catalog, version=2, token=TRAINER, vocab_size=t.vocab)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv:
        assert rcv.update_weights().version == 2
    assert_same_weights(engine_model, v2)
    assert_same_logits(engine_model, v2)
