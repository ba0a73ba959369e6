"""Publisher on a GPTModel in Megatron DDP with the distributed optimizer: two GPUs, NCCL, real NIXL.

GPU only: megatron-core 0.16.1's distributed optimizer accepts only `torch.cuda.*Tensor` parameters
(`DistributedOptimizer._build_model_and_main_param_groups`) and DDP allocates its buffers on
`torch.cuda.current_device()`, so this cannot run on the CPU machine (the CPU test of the same path
without the optimizer is tests/integration/test_publisher_ddp.py). On two GPUs:
`bash bench/scripts/gpu_megatron_ddp.sh`.

Two trainer ranks (TP1, DP2) train a bf16 llama-shaped GPTModel on random tokens, with
`overlap_param_gather` on (the all-gather is deferred to the next forward) and off (the step gathers).
After each step every rank publishes; a receiver in this process (a plain-tensor engine on GPU
`$REFIT_TEST_RECEIVER_GPU`, default 0) pulls the version. The ground truth is each rank's own
updated shard of the param buffers, gathered with plain `torch.distributed.all_gather`
(tests/support/ddp_ops.py); the receiver's HF tensors go back to Megatron's layout through the
test's own converter.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.support import ddp_ops
from tests.support.cluster import TrainerCluster

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)

VERSIONS = (1, 2, 3)
RECEIVER_GPU = int(os.environ.get("REFIT_TEST_RECEIVER_GPU", "0"))  # the trainer ranks use GPUs 0 and 1


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap_param_gather", "step_gathers"])
def test_publishes_the_weights_of_the_next_forward(overlap: bool) -> None:
    from refit_server import CatalogServer

    name = f"ddp-{'overlap' if overlap else 'sync'}"
    with CatalogServer(store="memory", port=0).start() as server, TrainerCluster(world_size=2, cuda=True) as cluster:
        built = cluster.run("tests.support.ddp_ops:build", timeout_s=300, catalog=server.address, name=name,
                            tp=1, overlap=overlap)  # fmt: skip
        for b in built:
            assert b["dp_size"] == 2
            assert b["param_storages"] == 0  # every parameter is a view of a DDP param buffer
            assert b["registrations"] == b["buffers"]  # those buffers are what is registered, as they are
        if overlap:
            assert built[0]["bucket_groups"] > 1  # several all-gathers, chained by the pre-hooks
        rcv = None
        try:
            for version in VERSIONS:
                ranks = cluster.run("tests.support.ddp_ops:step", timeout_s=300, version=version)
                for r in ranks:
                    # The check is meaningful: with the gather deferred, each rank's buffer holds its
                    # peer's shard from before the step, which is what publishing without the fix exposes.
                    assert (r["stale_before"] > 0) == overlap, r["stale_before"]
                    assert r["stale_after"] == 0
                    assert r["pending_gathers"] == []
                assert any(r["state"] == "READY" for r in ranks)
                if rcv is None:
                    rcv = ddp_ops.receiver(server.address, name, version, torch.device("cuda", RECEIVER_GPU))
                try:
                    result = rcv.update_weights(version=version)
                except Exception:
                    _print_regions(server.address, name, version)  # shown with the failure: what each rank registered
                    raise
                assert result.version == version
                assert ddp_ops.differing(rcv, ranks[0]["truth"]) == [], f"v{version}: pulled bytes differ"
                # The next forward uses exactly these bytes: its pre-hooks start no all-gather, change nothing.
                for g in cluster.run("tests.support.ddp_ops:forward_gathers", timeout_s=120):
                    assert g == {"started": [], "changed": 0}
        finally:
            if rcv is not None:
                rcv.close()
            cluster.run("tests.support.ddp_ops:close", timeout_s=60)


def _print_regions(catalog: str, name: str, version: int) -> None:
    from refit.catalog.client import CatalogClient

    with CatalogClient(catalog) as client:
        for source in client.get_sources(name=name, version=version):
            for g in source.regions:
                print(f"rank {source.rank} region {g.index}: {g.addr:#x}+{g.nbytes} on {g.device}:{g.device_id}")
