"""Publisher on GPTModels in Megatron DDP with the distributed optimizer, trained on CPU (gloo).

Each trainer rank wraps its bf16 GPTModel chunk(s) in megatron-core's DistributedDataParallel
(`use_distributed_optimizer=True`; `overlap_param_gather` on: the all-gather of the peers' shards
is left to the next forward; or off: the step gathers) and trains with megatron-core's own
DistributedOptimizer (run on CPU by the cluster's optimizer shims), then publishes each version.
Layouts: TP1 x DP2; PP2 x VPP2 x DP2 (a list of model chunks, each in its own DDP, as Megatron-LM
wires them); TP2 x DP2. The ground truth is each rank's own updated shards gathered with plain
`torch.distributed.all_gather` (tests/support/ddp_ops.py); a TP1 receiver pulls each version over
real NIXL and its HF tensors, converted back to every chunk's Megatron layout by the test's own
converter, must equal it bit for bit. Every write of parameter bytes (the optimizer's copy into
the bf16 shards, every bucket group's all-gather, the step's or the publisher's) is preceded by a
look at the real catalog: the version last published must already be RETIRED
(tests/support/ddp_check.py). The GPU test with NCCL and CUDA memory is tests/gpu/test_megatron_ddp.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.support.cluster import TrainerCluster
from tests.support.ddp_check import train_and_pull

OVERLAP = pytest.mark.parametrize("overlap", [True, False], ids=["overlap_param_gather", "step_gathers"])
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dp2_cluster() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=2, timeout_s=300.0) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def world4_cluster() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=4, timeout_s=300.0) as cluster:
        yield cluster


@OVERLAP
def test_tp1_dp2(dp2_cluster: TrainerCluster, catalog: str, overlap: bool) -> None:
    train_and_pull(dp2_cluster, catalog, name=f"ddp-tp1-{overlap}", overlap=overlap, cuda=False, receiver_device=CPU,
                   tp=1)  # fmt: skip


@OVERLAP
def test_pp2_vpp2_dp2(world4_cluster: TrainerCluster, catalog: str, overlap: bool) -> None:
    train_and_pull(world4_cluster, catalog, name=f"ddp-vpp-{overlap}", overlap=overlap, cuda=False,
                   receiver_device=CPU, tp=1, pp=2, vpp=2)  # fmt: skip


@OVERLAP
def test_tp2_dp2(world4_cluster: TrainerCluster, catalog: str, overlap: bool) -> None:
    train_and_pull(world4_cluster, catalog, name=f"ddp-tp2-{overlap}", overlap=overlap, cuda=False,
                   receiver_device=CPU, tp=2)  # fmt: skip
