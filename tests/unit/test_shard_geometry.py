"""The one shard formula (`refit.types.shard_geometry`, `TensorDesc.shard`) against hand-computed shards.

Megatron-Core's split, written out by hand: a tensor cut on `partition_dim` into `stride` equal parts,
TP rank r of t holding rows [r*n/(t*s), (r+1)*n/(t*s)) of every part (stored part after part).
"""

from __future__ import annotations

import pytest

from refit.errors import ConfigError
from refit.types import Role, TensorDesc, shard_geometry


@pytest.mark.parametrize(
    ("role", "shape", "rank", "size", "local", "offset"),
    [
        (Role.COLUMN, (96, 8), 2, 3, (32, 8), 64),
        (Role.QKV_COLUMN, (48, 16), 1, 4, (12, 16), 12),
        (Role.ROW, (8, 96), 1, 2, (8, 48), 48),
        (Role.VOCAB_PARALLEL, (128, 8), 3, 4, (32, 8), 96),
        # [gate; up] of 2x64 rows at TP 2: rank 1 holds gate rows 32..64 and up rows 32..64.
        (Role.GATED_MLP_COLUMN, (128, 8), 1, 2, (64, 8), 32),
        (Role.EXPERT_GATED_COLUMN, (16, 4), 3, 4, (4, 4), 6),
        (Role.EXPERT_ROW, (4, 16), 1, 2, (4, 8), 8),
        (Role.REPLICATED, (7,), 1, 2, (7,), 0),
    ],
)
def test_shard_matches_megatron_split(role, shape, rank, size, local, offset) -> None:
    desc = TensorDesc.shard(name="t", role=role, dtype="bfloat16", global_shape=shape, rank=rank, size=size)
    assert (desc.local_shape, desc.offset) == (local, offset)
    assert (desc.partition_dim, desc.partition_stride) == (role.partition_dim, role.partition_stride)
    assert desc.global_shape == shape


def test_every_rank_covers_each_part_once() -> None:
    rows, size, stride = 96, 4, 2
    covered: list[int] = []
    for rank in range(size):
        (local, _), offset = shard_geometry(
            name="fc1", global_shape=(rows, 8), partition_dim=0, partition_stride=stride, rank=rank, size=size
        )
        covered.extend(range(offset, offset + local // stride))
    assert sorted(covered) == list(range(rows // stride))


@pytest.mark.parametrize(("rows", "size", "stride", "rank"), [(10, 4, 1, 0), (12, 4, 2, 0), (8, 2, 1, 2), (8, 0, 1, 0)])
def test_a_split_that_does_not_fit_is_refused_naming_the_tensor(rows, size, stride, rank) -> None:
    with pytest.raises(ConfigError, match=r"decoder\.x"):
        shard_geometry(
            name="decoder.x", global_shape=(rows, 4), partition_dim=0, partition_stride=stride, rank=rank, size=size
        )
