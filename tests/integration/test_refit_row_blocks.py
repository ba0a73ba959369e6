"""Column blocks end to end (`Publisher(row_blocks=4)`): real megatron-core trainers (gloo, separate
processes) publish their row-parallel shards as contiguous column blocks, live (from a registered
mirror) or from snapshot slots; receivers pull over NIXL into a Hugging Face engine at TP 1 and into
Megatron engine ranks at TP 2. Every tensor is then bit-identical to the HF model the trainer weights
were converted from, after v1 and after a v2 that changed every parameter in place.

The worker-side steps only these tests need are defined here and run on every rank as `HERE:function`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from refit import Receiver
from refit.catalog.client import CatalogClient
from refit.engines import HFEngine
from refit.types import Role
from tests.support import hf_models as hm
from tests.support.cluster import TrainerCluster
from tests.support.refit_harness import OPS, assert_same_logits, assert_same_weights, write_state

HERE = "tests.integration.test_refit_row_blocks"
K = 4
ROW_ROLES = {Role.ROW, Role.EXPERT_ROW}


def publish_blocked(
    state: dict, rank: int, world_size: int, *, key: str, catalog: str, version: int, row_blocks: int,
    snapshots: int = 0, vocab_size: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """`refit_ops.publish` with `row_blocks`; the publisher stays in `state["publishers"]` (closed by the harness)."""
    from refit import Publisher

    pubs = state.setdefault("publishers", {})
    if key not in pubs:
        pubs[key] = Publisher(catalog=catalog, model=state[key], name=key, snapshots=snapshots,
                              vocab_size=vocab_size, row_blocks=row_blocks)  # fmt: skip
    pub = pubs[key]
    info = pub.stream_weights(version)
    return {"state": info.state.value, "registrations": pub.num_registrations, "extra_bytes": pub.extra_bytes}


def refit_megatron_engine(state: dict, rank: int, world_size: int, *, catalog: str, name: str) -> dict[str, Any]:
    """Refit this rank's Megatron engine; what differs from the ground truth, and how its plan read the bytes."""
    import torch
    from megatron.core import parallel_state as ps

    from refit.engines import MegatronEngine

    engine, truth = state["engine"], state["truth"]
    with Receiver(catalog=catalog, engine=MegatronEngine(engine), name=name,
                  replica=ps.get_data_parallel_rank()) as rcv:  # fmt: skip
        result = rcv.update_weights()
        plan = rcv.plan
    want = dict(truth.named_parameters())
    return {
        "version": result.version,
        "differ": [n for n, p in engine.named_parameters() if not torch.equal(p, want[n])],
        "strided_pieces": sum(p.count > 1 for p in plan.pieces),
        "row_tensors_read": len({p.tensor for p in plan.pieces if p.tensor.endswith("linear_fc2.weight")}),
    }


def _published(catalog: str, name: str, version: int) -> tuple[Counter, set[str]]:
    """Per (rank, tensor) the descriptors published, and the names of row-parallel tensors."""
    with CatalogClient(catalog) as client:
        sources = client.get_sources(name=name, version=version)
    per = Counter((s.rank, d.name) for s in sources for d in s.tensors)
    rows = {d.name for s in sources for d in s.tensors if d.role in ROW_ROLES}
    return per, rows


def _check_blocks(catalog: str, name: str, version: int) -> None:
    per, rows = _published(catalog, name, version)
    assert rows, "the model has row-parallel tensors"
    assert {n for (_, n), c in per.items() if c > 1} == rows  # exactly the row-parallel ones are blocked
    assert {c for (_, n), c in per.items() if n in rows} == {K}


@pytest.mark.parametrize(
    ("case", "layout", "snapshots"),
    [
        pytest.param(hm.LLAMA_GQA, dict(tp=1, pp=1), 0, id="llama-tp1-live"),
        pytest.param(hm.LLAMA_GQA, dict(tp=2, pp=2), 2, id="llama-tp2-pp2-snapshots"),
        pytest.param(hm.QWEN3_MOE, dict(tp=2, ep=2, etp=1, pp=1), 0, id="qwen3-moe-tp2-ep2-live"),
    ],
)
def test_blocked_publish_into_hf_is_bit_exact_for_two_versions(trainer, catalog, case, layout, snapshots) -> None:
    t = trainer(case, **layout)
    engine_model = hm.build_hf_model(case, seed=99)

    def publish(version: int) -> list[dict]:
        return t.cluster.run(f"{HERE}:publish_blocked", key=t.name, catalog=catalog, version=version, row_blocks=K,
                             snapshots=snapshots, vocab_size=t.vocab)  # fmt: skip

    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv:
        first = publish(1)
        _check_blocks(catalog, t.name, 1)
        assert all(r["extra_bytes"] > 0 for r in first)  # the live mirror, or the snapshot slots
        assert rcv.update_weights().version == 1
        assert_same_weights(engine_model, t.hf)
        assert_same_logits(engine_model, t.hf)

        v2 = t.step(seed=2)
        if not snapshots:
            t.cluster.run(f"{OPS}:invalidate", name=t.name)
        again = publish(2)
        assert rcv.update_weights().version == 2
        assert_same_weights(engine_model, v2)
        assert_same_logits(engine_model, v2)
    # The mirror (or the slots) was registered once, not again for the later version.
    assert [r["registrations"] for r in again] == [r["registrations"] for r in first]


@pytest.fixture(scope="module")
def engine_cluster() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=2, timeout_s=300.0) as cluster:
        yield cluster


def test_megatron_engine_at_tp2_reads_whole_blocks_bit_exact(trainer, catalog, engine_cluster, tmp_path) -> None:
    """Trainer TP 1, engine TP 2: without blocks each row-parallel slice is strided (one run per row);
    blocked, every piece is contiguous, and the engine still equals the ground truth at its TP."""
    case = hm.QWEN3_QKNORM
    t = trainer(case, tp=1, pp=1)
    garbage = write_state(hm.build_hf_model(case, seed=42), tmp_path / "engine-init.safetensors")
    truth1 = write_state(t.hf, tmp_path / "truth1.safetensors")
    engine_cluster.run("tests.support.engine_ops:build_pair", case=case.id, init_path=str(garbage),
                       truth_path=str(truth1), tp=2)  # fmt: skip
    t.cluster.run(f"{HERE}:publish_blocked", key=t.name, catalog=catalog, version=1, row_blocks=K)
    _check_blocks(catalog, t.name, 1)
    for out in engine_cluster.run(f"{HERE}:refit_megatron_engine", catalog=catalog, name=t.name):
        assert out["version"] == 1 and out["differ"] == [], out["differ"]
        assert out["row_tensors_read"] == case.num_layers and out["strided_pieces"] == 0
    assert all(engine_cluster.run("tests.support.engine_ops:logits_equal"))

    v2 = t.step(seed=2)
    t.cluster.run(f"{OPS}:invalidate", name=t.name)
    t.cluster.run(f"{HERE}:publish_blocked", key=t.name, catalog=catalog, version=2, row_blocks=K)
    engine_cluster.run("tests.support.trainer_ops:load", key="truth",
                       hf_path=str(write_state(v2, tmp_path / "truth2.safetensors")))  # fmt: skip
    for out in engine_cluster.run(f"{HERE}:refit_megatron_engine", catalog=catalog, name=t.name):
        assert out["version"] == 2 and out["differ"] == [] and out["strided_pieces"] == 0
