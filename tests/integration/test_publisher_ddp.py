"""Publisher on GPTModels in Megatron DDP with the distributed optimizer, trained on CPU (gloo).

Each trainer rank wraps its bf16 GPTModel chunk(s) in megatron-core's DistributedDataParallel
(`use_distributed_optimizer=True`; `overlap_param_gather` on: the all-gather of the peers' shards
is left to the next forward; or off: the step gathers) and trains with megatron-core's own
DistributedOptimizer (run on CPU by the cluster's optimizer shims), then publishes each version.
Layouts: TP1 x DP2; PP2 x VPP2 x DP2 (a list of four-layer model chunks, each in its own DDP, as
Megatron-LM wires them); TP2 x DP2. The ground truth is each rank's own updated shards gathered with
plain `torch.distributed.all_gather` (tests/support/ddp_ops.py); a TP1 receiver pulls each version
and its HF tensors, converted back to every chunk's Megatron layout by the test's own converter,
must equal it bit for bit. Every write of parameter bytes (the optimizer's copy into the bf16
shards, every bucket group's all-gather, the step's or the publisher's) is preceded by a look at
the real catalog: the version last published must already be RETIRED. The GPU test with NCCL and
CUDA memory is tests/gpu/test_megatron_ddp.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.support import ddp_ops
from tests.support.cluster import TrainerCluster

VERSIONS = (1, 2)


@pytest.fixture(scope="module")
def dp2_cluster() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=2, timeout_s=300.0) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def world4_cluster() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=4, timeout_s=300.0) as cluster:
        yield cluster


def _check_order(r: dict, *, version: int, overlap: bool, gathers: int) -> None:
    """Every write of parameter bytes came after the version last published was RETIRED in the catalog."""
    step, publish = r["step_writes"], r["publish_writes"]
    if version == VERSIONS[0]:
        assert step == [] and publish == []  # nothing published before: nothing to retire
        return
    assert {state for _, state in step + publish} == {"RETIRED"}, (step, publish)
    assert any(w.startswith("shard write") for w, _ in step)  # the optimizer's copy into the bf16 shards
    step_gathers = [w for w, _ in step if w.startswith("gather")]
    publish_gathers = [w for w, _ in publish if w.startswith("gather")]
    # overlap_param_gather: the publisher forces the deferred all-gather of every bucket group of
    # every chunk; otherwise the step gathered them all and the publisher gathers nothing.
    assert (len(publish_gathers), len(step_gathers)) == ((gathers, 0) if overlap else (0, gathers))


def _train_and_pull(cluster: TrainerCluster, catalog: str, *, name: str, overlap: bool, **layout: int) -> None:
    built = cluster.run("tests.support.ddp_ops:build", timeout_s=300, catalog=catalog, name=name, overlap=overlap,
                        cuda=False, order_probe=True, **layout)  # fmt: skip
    for b in built:
        assert b["dp_size"] == 2
        assert b["param_storages"] == 0  # every parameter is a view of a DDP param buffer
        assert b["registrations"] == b["buffers"]  # the buffers are registered as they are, not copied
        if overlap:
            assert b["bucket_groups"][0] > 1  # several all-gathers, chained by the pre-hooks
    rcv = None
    try:
        for version in VERSIONS:
            ranks = cluster.run("tests.support.ddp_ops:step", timeout_s=300, version=version)
            for r, b in zip(ranks, built, strict=True):
                # With the gather deferred, each rank's buffers hold its peer's shards from before the
                # step: what publishing without the forced gather would expose.
                assert (r["stale_before"] > 0) == overlap, r["stale_before"]
                assert r["stale_after"] == 0
                assert r["pending_gathers"] == []
                _check_order(r, version=version, overlap=overlap, gathers=sum(b["bucket_groups"]))
            assert any(r["state"] == "READY" for r in ranks)  # the last rank to publish made it READY
            if rcv is None:
                rcv = ddp_ops.receiver(catalog, name, version, torch.device("cpu"))
            assert rcv.update_weights(version=version).version == version
            assert ddp_ops.differing(rcv, [r["truth"] for r in ranks]) == []
            # The next forward uses these bytes as they are: its pre-hooks start no all-gather.
            for g in cluster.run("tests.support.ddp_ops:forward_gathers", timeout_s=120):
                assert g == {"started": [], "changed": 0}
    finally:
        if rcv is not None:
            rcv.close()
        cluster.run("tests.support.ddp_ops:close", timeout_s=60)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap_param_gather", "step_gathers"])
def test_tp1_dp2(dp2_cluster: TrainerCluster, catalog: str, overlap: bool) -> None:
    _train_and_pull(dp2_cluster, catalog, name=f"ddp-tp1-{overlap}", overlap=overlap, tp=1)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap_param_gather", "step_gathers"])
def test_pp2_vpp2_dp2(world4_cluster: TrainerCluster, catalog: str, overlap: bool) -> None:
    _train_and_pull(world4_cluster, catalog, name=f"ddp-vpp-{overlap}", overlap=overlap, tp=1, pp=2, vpp=2)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap_param_gather", "step_gathers"])
def test_tp2_dp2(world4_cluster: TrainerCluster, catalog: str, overlap: bool) -> None:
    _train_and_pull(world4_cluster, catalog, name=f"ddp-tp2-{overlap}", overlap=overlap, tp=2)
