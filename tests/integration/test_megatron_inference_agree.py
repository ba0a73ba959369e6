"""`RankAgreement`: every engine rank learns every other's outcome of a refit step (two gloo ranks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.cluster import TrainerCluster

OPS = "tests.support.agree_ops"


@pytest.fixture(scope="module")
def ranks() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=2, timeout_s=300.0) as cluster:
        yield cluster


@pytest.mark.parametrize(
    ("failed", "versions", "want"),
    [
        ([], [3, 3], dict(any_failed=False, all_failed=False, min_version=3, max_version=3, same_version=True)),
        ([], [3, 4], dict(any_failed=False, all_failed=False, min_version=3, max_version=4, same_version=False)),
        ([1], [5, 9], dict(any_failed=True, all_failed=False, min_version=5, max_version=5, same_version=True)),
        ([0, 1], [5, 9], dict(any_failed=True, all_failed=True, min_version=-1, max_version=-1, same_version=True)),
    ],
    ids=["same", "newer-on-one-rank", "one-failed", "all-failed"],
)
def test_every_rank_learns_every_outcome(ranks: TrainerCluster, failed, versions, want) -> None:
    assert ranks.run(f"{OPS}:exchange", failed=failed, versions=versions) == [want, want]
