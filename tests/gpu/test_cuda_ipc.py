"""Trainer ranks on the receiver's host read over CUDA IPC (`refit.transport.cuda_ipc`): GPUs, real NIXL.

A trainer rank (its own process, GPU 0, bf16 GPTModel in Megatron DDP with the distributed optimizer,
built by tests/support/ddp_ops.py) publishes its GPU regions with their IPC handles; a receiver in
this process (a plain-tensor engine on GPU `$REFIT_TEST_RECEIVER_GPU`, default 0, so the same GPU as
the trainer on a one-GPU machine) maps them and copies the bytes itself. Checked, per version:

1. version 0 (as built): the receiver's HF tensors equal the HF model the trainer was built from,
   bit for bit; every byte was copied over CUDA IPC (`stats.ipc_copies` grew, nothing went through
   NIXL but the version words);
2. after an optimizer step, version 1 pulled over CUDA IPC equals the step's all-gathered truth,
   converted by the test's own converter; then version 2, pulled with `cuda_ipc=False` (over NIXL,
   no copy counted), equals its truth too, and so does version 3 with CUDA IPC again (the mapping kept).

`bash bench/scripts/gpu_cuda_ipc.sh` on the device tool (one H200 suffices).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.support.cluster import TrainerCluster
from tests.support.ddp_check import differing, differing_from_hf, receiver

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RECEIVER_GPU = int(os.environ.get("REFIT_TEST_RECEIVER_GPU", "0"))


def test_same_host_trainer_is_copied_over_cuda_ipc_bit_exact() -> None:
    from refit_server import CatalogServer

    name = "ipc-tp1"
    with (
        CatalogServer(store="memory", port=0).start() as server,
        TrainerCluster(world_size=1, cuda=True) as cluster,
    ):
        cluster.run("tests.support.ddp_ops:build", timeout_s=300, catalog=server.address, name=name, tp=1,
                    overlap=False, cuda=True)  # fmt: skip
        rcv = None
        try:
            cluster.run("tests.support.ddp_ops:publish_initial", timeout_s=120, version=0)
            rcv = receiver(server.address, name, 0, torch.device("cuda", RECEIVER_GPU))
            assert rcv.cuda_ipc
            assert rcv.update_weights(version=0).version == 0
            assert differing_from_hf(rcv) == []
            copies = rcv.stats.ipc_copies
            assert copies > 0, "no byte was copied over CUDA IPC"
            for version, ipc in ((1, True), (2, False), (3, True)):
                ranks = cluster.run("tests.support.ddp_ops:step", timeout_s=300, version=version)
                rcv.cuda_ipc = ipc
                before = rcv.stats.ipc_copies
                assert rcv.update_weights(version=version).version == version
                assert (rcv.stats.ipc_copies > before) == ipc, (version, ipc, before, rcv.stats.ipc_copies)
                assert differing(rcv, [r["truth"] for r in ranks]) == [], f"v{version}: pulled bytes differ"
        finally:
            if rcv is not None:
                rcv.close()
            cluster.run("tests.support.ddp_ops:close", timeout_s=60)
