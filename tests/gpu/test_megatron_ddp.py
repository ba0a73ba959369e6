"""Publisher on GPTModels in Megatron DDP with the distributed optimizer: GPUs, NCCL, real NIXL.

The CPU test of the same checks (tests/integration/test_publisher_ddp.py) runs megatron-core's
DistributedOptimizer on gloo through the cluster's optimizer shims; this one runs it as users do:
CUDA tensors, NCCL collectives, and NIXL reads of CUDA memory (cuda_ipc between processes and GPUs).
`bash bench/scripts/gpu_megatron_ddp.sh`.

One trainer rank per GPU (NCCL refuses two ranks of one communicator on one GPU), so each layout
needs `world` GPUs and is skipped with fewer: TP1 x DP2 (2 GPUs); PP2 x VPP2 x DP2, a list of model
chunks each in its own DDP (4 GPUs; Megatron allows VPP only with PP >= 2); TP2 x DP2 (4 GPUs). Each
with `overlap_param_gather` on (the all-gather is deferred to the next forward) and off (the step
gathers). After each step every rank publishes; a receiver in this process (a plain-tensor engine on
GPU `$REFIT_TEST_RECEIVER_GPU`, default 0) pulls the version. tests/support/ddp_check.py checks the
forced gather, that every write of parameter bytes follows the retirement of the last version in the
catalog, and the pulled bytes against each rank's own updated shards gathered with plain
`torch.distributed.all_gather`, converted through the test's own HF -> Megatron converter.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.support.cluster import TrainerCluster
from tests.support.ddp_check import train_and_pull

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)

VERSIONS = (1, 2, 3)
RECEIVER_GPU = int(os.environ.get("REFIT_TEST_RECEIVER_GPU", "0"))  # the trainer ranks use GPUs 0 .. world-1

LAYOUTS = [
    pytest.param(2, dict(tp=1), id="tp1-dp2"),
    pytest.param(4, dict(tp=1, pp=2, vpp=2), id="pp2-vpp2-dp2"),
    pytest.param(4, dict(tp=2), id="tp2-dp2"),
]


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap_param_gather", "step_gathers"])
@pytest.mark.parametrize(("world", "layout"), LAYOUTS)
def test_publishes_the_weights_of_the_next_forward(world: int, layout: dict, overlap: bool) -> None:
    from refit_server import CatalogServer

    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs (one trainer rank each), found {torch.cuda.device_count()}")
    name = f"ddp-{'-'.join(f'{k}{v}' for k, v in layout.items())}-{'overlap' if overlap else 'sync'}"
    with (
        CatalogServer(store="memory", port=0).start() as server,
        TrainerCluster(world_size=world, cuda=True) as cluster,
    ):
        train_and_pull(cluster, server.address, name=name, overlap=overlap, cuda=True,
                       receiver_device=torch.device("cuda", RECEIVER_GPU), versions=VERSIONS, **layout)  # fmt: skip
