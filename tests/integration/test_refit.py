"""End to end on real parts: Megatron trainer ranks (gloo, separate processes) -> gRPC catalog ->
NIXL pulls into this process -> a Hugging Face engine, checked bit for bit against the HF model the
trainer weights were converted from.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from refit import CatalogServer, Receiver
from refit.engines import HFEngine
from refit.errors import (
    CatalogUnavailableError,
    ModelMismatchError,
    VersionNotFoundError,
    VersionNotReadyError,
    VersionRetiredError,
)
from tests.support import hf_models as hm

OPS = "tests.support.refit_ops"
BUILD = "tests.support.trainer_ops:build"
LOAD = "tests.support.trainer_ops:load"
TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
_names = itertools.count()


@pytest.fixture(scope="module")
def catalog():  # noqa: ANN201
    with CatalogServer(store="memory", port=0).start() as server:
        yield server.address


def write_state(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def assert_same_weights(engine_model: torch.nn.Module, source: torch.nn.Module) -> None:
    want = dict(source.named_parameters())
    got = dict(engine_model.named_parameters())
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{name} differs"


def assert_same_logits(engine_model: torch.nn.Module, source: torch.nn.Module) -> None:
    with torch.no_grad():
        assert torch.equal(engine_model(TOKENS).logits, source(TOKENS).logits)


class Trainer:
    """One model on the trainer cluster, published under a fresh catalog name."""

    def __init__(self, cluster, catalog: str, tmp: Path, case: hm.ModelCase, **layout: int | None) -> None:  # noqa: ANN001
        self.cluster, self.catalog, self.tmp, self.case = cluster, catalog, tmp, case
        self.name = f"{case.id}-{next(_names)}"
        self.hf = hm.build_hf_model(case, seed=1)
        tp = layout.get("tp") or 1
        self.vocab = case.hf_config["vocab_size"] if hm.padded_vocab(case, tp) != case.hf_config["vocab_size"] else 0
        cluster.run(BUILD, key=self.name, case=case.id, hf_path=str(write_state(self.hf, tmp / "v1.safetensors")), **layout)

    def publish(self, version: int, **kwargs: object) -> list[dict]:
        return self.cluster.run(
            f"{OPS}:publish", key=self.name, catalog=self.catalog, version=version, vocab_size=self.vocab, **kwargs
        )

    def step(self, seed: int) -> torch.nn.Module:
        """Change every weight in place (what an optimizer step does) to a new HF ground truth."""
        model = hm.build_hf_model(self.case, seed=1)
        model.load_state_dict(hm.perturbed_state_dict(model.state_dict(), seed=seed))
        self.cluster.run(LOAD, key=self.name, hf_path=str(write_state(model, self.tmp / f"s{seed}.safetensors")))
        return model

    def close(self) -> None:
        self.cluster.run(f"{OPS}:close_publisher", name=self.name)
        self.cluster.run("tests.support.trainer_ops:drop", key=self.name)


@pytest.fixture
def trainer(trainer_cluster, catalog, tmp_path):  # noqa: ANN001, ANN201
    made: list[Trainer] = []

    def make(case: hm.ModelCase, **layout: int | None) -> Trainer:
        made.append(Trainer(trainer_cluster, catalog, tmp_path, case, **layout))
        return made[-1]

    yield make
    for t in made:
        t.close()


LAYOUTS = [
    pytest.param(hm.LLAMA_GQA, dict(tp=tp, pp=pp), id=f"llama-gqa-tp{tp}-pp{pp}")
    for tp, pp in itertools.product((1, 2, 4), (1, 2))
] + [
    pytest.param(hm.LLAMA_1KV_TIED, dict(tp=2, pp=1), id="llama-1kv-tied-tp2"),
    pytest.param(hm.QWEN2_BIAS, dict(tp=2, pp=2), id="qwen2-bias-tp2-pp2"),
    pytest.param(hm.QWEN3_QKNORM, dict(tp=4, pp=1), id="qwen3-qknorm-tp4"),
    pytest.param(hm.LLAMA_PADDED, dict(tp=2, pp=1), id="llama-padded-vocab-tp2"),
    pytest.param(hm.LLAMA_4L, dict(tp=1, pp=2, vpp=2), id="llama-tp1-pp2-vpp2"),
]


@pytest.mark.parametrize(("case", "layout"), LAYOUTS)
def test_refit_is_bit_exact_for_every_layout_and_two_versions(trainer, catalog, case, layout) -> None:  # noqa: ANN001
    t = trainer(case, **layout)
    engine_model = hm.build_hf_model(case, seed=99)
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv:
        storage = {n: p.data_ptr() for n, p in engine_model.named_parameters()}
        results = t.publish(1)
        assert "READY" in {r["state"] for r in results}  # seen by whichever rank published last
        registrations = [r["registrations"] for r in results]
        r1 = rcv.update_weights()
        assert (r1.version, r1.num_tensors) == (1, len(storage))
        assert r1.bytes > 0 and r1.seconds > 0
        assert_same_weights(engine_model, t.hf)
        assert_same_logits(engine_model, t.hf)

        v2 = t.step(seed=2)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        assert rcv.update_weights().version == 2
        assert_same_weights(engine_model, v2)
        assert_same_logits(engine_model, v2)
        # Parameters were updated in place: same storage, so holders of the tensors see new weights.
        assert storage == {n: p.data_ptr() for n, p in engine_model.named_parameters()}
    # Memory was registered once per trainer rank, not again for later versions.
    assert [r["registrations"] for r in t.publish(3)] == registrations
