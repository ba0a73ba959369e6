"""The refit side of the integration harness: a model on the trainer cluster, published under a
fresh catalog name, and the bit-exactness checks every refit test uses.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.support import hf_models as hm

OPS = "tests.support.refit_ops"
BUILD = "tests.support.trainer_ops:build"
LOAD = "tests.support.trainer_ops:load"
TOKENS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
_names = itertools.count()


def write_state(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def assert_same_weights(engine_model: torch.nn.Module, source: torch.nn.Module) -> None:
    _assert_same(dict(engine_model.named_parameters()), dict(source.named_parameters()))


def assert_same_state(engine_model: torch.nn.Module, source: torch.nn.Module) -> None:
    """Parameters and persistent buffers (an MLA router's `e_score_correction_bias`) bit-identical."""
    _assert_same(engine_model.state_dict(), source.state_dict())


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{name} differs"


def assert_same_logits(engine_model: torch.nn.Module, source: torch.nn.Module) -> None:
    with torch.no_grad():
        assert torch.equal(engine_model(TOKENS).logits, source(TOKENS).logits)


class Trainer:
    """One model on the trainer cluster, published under a fresh catalog name."""

    def __init__(self, cluster, catalog: str, tmp: Path, case: hm.ModelCase, **layout: int | None) -> None:
        self.cluster, self.catalog, self.tmp, self.case = cluster, catalog, tmp, case
        self.name = f"{case.id}-{next(_names)}"
        self.hf = hm.build_hf_model(case, seed=1)
        tp = layout.get("tp") or 1
        self.vocab = case.hf_config["vocab_size"] if hm.padded_vocab(case, tp) != case.hf_config["vocab_size"] else 0
        cluster.run(
            BUILD, key=self.name, case=case.id, hf_path=str(write_state(self.hf, tmp / "v1.safetensors")), **layout
        )

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
