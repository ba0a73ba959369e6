"""Ranks of a `TrainerCluster` reporting refit step outcomes through `RankAgreement` (real gloo all-reduce)."""

from __future__ import annotations

import dataclasses
from typing import Any


def exchange(state: dict, rank: int, world_size: int, *, failed: list[int], versions: list[int]) -> dict[str, Any]:
    """Rank r reports failure if r is in `failed`, else `versions[r]`; returns what every rank agreed."""
    from refit.megatron_inference.agree import RankAgreement

    agreed = RankAgreement().exchange(failed=rank in failed, version=versions[rank])
    return dataclasses.asdict(agreed) | {"same_version": agreed.same_version}
