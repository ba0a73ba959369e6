"""What the ground-truth tests share: the token batch, HF and Megatron logits, saving a state dict
for the trainer cluster, and building (then dropping) models on that cluster."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.support import hf_models as hm
from tests.support.cluster import TrainerCluster

OPS = "tests.support.trainer_ops"
TOKENS = [[1, 5, 9, 2, 7, 3, 11, 4, 250, 0, 17, 42], [3, 3, 8, 200, 6, 1, 2, 77, 5, 9, 511, 13]]
_keys = itertools.count()

Build = Callable[..., tuple[str, list[dict]]]


def write_state(sd: dict[str, torch.Tensor], path: Path) -> str:
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float()


def megatron_logits(cluster: TrainerCluster, key: str) -> list[torch.Tensor]:
    """One logits tensor per data-parallel replica (from its TP rank 0)."""
    out = cluster.run(f"{OPS}:logits", key=key, tokens=TOKENS)
    got = [t for t in out if t is not None]
    assert got, "no rank returned logits"
    return got


def max_diff(got: list[torch.Tensor], want: torch.Tensor) -> float:
    assert all(g.shape == want.shape for g in got), ([g.shape for g in got], want.shape)
    return max(float((g - want).abs().max()) for g in got)


def builder(cluster: TrainerCluster, tmp_path: Path, prefix: str) -> Iterator[Build]:
    """`build(case, hf_state_dict, **layout) -> (key, summaries)` on the shared cluster; every model
    built is dropped afterwards (the generator body of a fixture)."""
    keys: list[str] = []

    def build(case: hm.ModelCase, hf_sd: dict[str, torch.Tensor], **layout: int | None) -> tuple[str, list[dict]]:
        key = f"{prefix}-{case.id}-{next(_keys)}"
        path = write_state(hf_sd, tmp_path / f"{key}.safetensors")
        summaries = cluster.run(f"{OPS}:build", key=key, case=case.id, hf_path=path, **layout)
        keys.append(key)
        return key, summaries

    yield build
    for key in keys:
        cluster.run(f"{OPS}:drop", key=key)
