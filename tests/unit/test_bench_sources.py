"""The benchmark's synthetic trainer sources: the library's descriptors, and every weight once per replica."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from refit.errors import ConfigError
from refit.plan.targets import EXPERT_ROLES
from refit.types import SourceRecord, TensorDesc
from refit_bench.trainer_sources import TrainerLayout, global_tensors, load_config, synthesize_sources

# A tiny Qwen3-shaped dense model: GQA with fused QKV and q/k norms, gated MLP.
TINY_GQA: dict[str, Any] = {
    "model_type": "qwen3",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 5,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "qk_layernorm": True,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

CASES = [
    pytest.param("tiny-mla-moe", TrainerLayout(tp=2, pp=2, ep=2, dp=2), id="mla-moe-tp2-pp2-ep2-dp2"),
    pytest.param("tiny-mla-moe", TrainerLayout(tp=2, ep=2, etp=2, dp=2), id="mla-moe-tp2-ep2-etp2-dp2"),
    pytest.param("tiny-mla-moe", TrainerLayout(tp=4, pp=3, ep=4), id="mla-moe-tp4-pp3-ep4"),
    pytest.param(TINY_GQA, TrainerLayout(tp=4, pp=2, dp=2), id="gqa-tp4-pp2-dp2"),
    pytest.param(TINY_GQA, TrainerLayout(tp=2, dp=3), id="gqa-tp2-dp3"),
]


def _sources(model: str | dict[str, Any], layout: TrainerLayout) -> tuple[dict[str, Any], list[SourceRecord]]:
    cfg = load_config(model) if isinstance(model, str) else model
    return cfg, synthesize_sources(cfg, layout)[1]


def _expert_tp_rank(rank: int, layout: TrainerLayout) -> int:
    # Megatron's expert rank order is tp-ep-dp-pp: expert TP fastest within a stage's tp * dp ranks.
    return rank % (layout.tp * layout.dp) % layout.etp


def _replica(src: SourceRecord, desc: TensorDesc, layout: TrainerLayout) -> tuple[int, ...]:
    """Which full copy of `desc`'s tensor this rank's shard belongs to."""
    if desc.role in EXPERT_ROLES:  # expert data-parallel rank: after expert TP and EP
        return ((src.rank % (layout.tp * layout.dp)) // (layout.ep * layout.etp),)
    if desc.partition_dim == -1:  # replicated: every TP rank of every data-parallel replica holds a copy
        return src.coords.dp_rank, src.coords.tp_rank
    return (src.coords.dp_rank,)


def _rows(desc: TensorDesc) -> list[tuple[int, int]]:
    """Global rows along `partition_dim` this shard holds (TensorDesc's definition: 1/size of every part)."""
    d, s = desc.partition_dim, desc.partition_stride
    part, local = desc.global_shape[d] // s, desc.local_shape[d] // s
    return [(k * part + desc.offset, k * part + desc.offset + local) for k in range(s)]


@pytest.mark.parametrize(("model", "layout"), CASES)
def test_every_shard_is_the_library_descriptor_of_its_rank(model: str | dict[str, Any], layout: TrainerLayout) -> None:
    _, sources = _sources(model, layout)
    assert [s.rank for s in sources] == list(range(layout.world))
    for src in sources:
        assert src.coords == layout.coords(src.rank)
        for desc in src.tensors:
            expert = desc.role in EXPERT_ROLES
            rank, size = (_expert_tp_rank(src.rank, layout), layout.etp) if expert else (src.coords.tp_rank, layout.tp)
            expected = TensorDesc.shard(
                name=desc.name, role=desc.role, dtype=desc.dtype, global_shape=desc.global_shape, rank=rank,
                size=size, byte_offset=desc.byte_offset,
            )  # fmt: skip
            assert desc == expected, f"rank {src.rank}: {desc.name}"


@pytest.mark.parametrize(("model", "layout"), CASES)
def test_each_replica_covers_every_global_tensor_exactly_once(
    model: str | dict[str, Any], layout: TrainerLayout
) -> None:
    cfg, sources = _sources(model, layout)
    tensors = {t.name: t for t in global_tensors(cfg, layout.pp)}
    held: dict[str, dict[tuple[int, ...], list[TensorDesc]]] = defaultdict(lambda: defaultdict(list))
    for src in sources:
        for desc in src.tensors:
            held[desc.name][_replica(src, desc, layout)].append(desc)
    assert set(held) == set(tensors)  # every global tensor is published, and nothing else
    for name, replicas in held.items():
        first = next(iter(replicas.values()))[0]
        t = tensors[name]
        assert first.global_shape[1:] == t.shape[1:] and first.global_shape[0] >= t.shape[0]  # vocab: padded
        if first.role in EXPERT_ROLES:
            copies = layout.edp
        elif first.partition_dim == -1:
            copies = layout.tp * layout.dp
        else:
            copies = layout.dp
        assert len(replicas) == copies, name
        for replica, descs in replicas.items():
            assert {d.global_shape for d in descs} == {first.global_shape}
            if first.partition_dim == -1:
                assert len(descs) == 1 and descs[0].local_shape == descs[0].global_shape, (name, replica)
                continue
            cover = np.zeros(first.global_shape[first.partition_dim], dtype=np.int64)
            for d in descs:
                for a, b in _rows(d):
                    cover[a:b] += 1
            assert (cover == 1).all(), f"{name}, replica {replica}: rows covered {sorted(set(cover.tolist()))} times"


def test_trainer_layout_is_checked_by_the_library_before_anything_is_built() -> None:
    with pytest.raises(ConfigError, match="tp_size"):
        TrainerLayout(tp=0)
    with pytest.raises(ConfigError, match="dp_size"):
        TrainerLayout(dp=-1)
    with pytest.raises(ConfigError, match="etp"):
        TrainerLayout(etp=0)
    with pytest.raises(ConfigError, match="multiple of ep"):
        TrainerLayout(tp=2, ep=4)


def test_a_tensor_that_does_not_split_over_the_trainer_tp_is_named() -> None:
    # MLA with 4 heads: linear_kv_up_proj has 4 * (8 + 8) = 64 rows, which 3 ranks cannot share.
    with pytest.raises(ConfigError, match=r"layers\.0\.self_attention\.linear_kv_up_proj\.weight: dim 0 \(64 rows"):
        synthesize_sources(load_config("tiny-mla-moe"), TrainerLayout(tp=3))


def test_the_link_bound_is_the_slowest_link_of_the_ranks_gpus() -> None:
    from refit_bench.measure import link_bound_s

    # Trainer TP2 on GPUs 0 and 1, the receiver on GPU 1: half across NVLink (400 GB/s), half local (2 TB/s).
    half = 8_000_000_000
    assert link_bound_s({0: half, 1: half}, gpus=2, receiver_gpu=1, peer_gbps=400, local_gbps=2000) == half / 400e9
    # Four ranks on two GPUs: the two ranks of the far GPU share its link.
    by_rank = {0: 1e9, 1: 1e9, 2: 1e9, 3: 1e9}
    assert link_bound_s(by_rank, gpus=2, receiver_gpu=1, peer_gbps=400, local_gbps=2000) == 2e9 / 400e9
    # Everything local: the device's own copy rate.
    assert link_bound_s({0: 4e9}, gpus=2, receiver_gpu=0, peer_gbps=400, local_gbps=2000) == 4e9 / 2000e9
    assert link_bound_s({}, gpus=2, receiver_gpu=0, peer_gbps=400, local_gbps=2000) == 0.0
