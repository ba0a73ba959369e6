"""Publisher on a GPTModel in Megatron DDP (distributed-optimizer buffers, `overlap_param_gather`) on CPU.

Two gloo trainer ranks (TP1, DP2) wrap a bf16 GPTModel in megatron-core's DistributedDataParallel
with `use_distributed_optimizer=True, overlap_param_gather=True`: its parameters become views of two
param buffers (bf16 weights, fp32 norms), split in buckets that each rank owns a shard of. The
distributed optimizer itself needs CUDA tensors, so each version is made as its step makes it: each
rank writes new values into its own shards only (`ddp_ops.shard_step`), and the peer's shards stay
stale until an all-gather. The ground truth is the owned shards gathered with plain
`torch.distributed.all_gather`. The GPU test with the real optimizer and training steps is
tests/gpu/test_megatron_ddp.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.support import ddp_ops
from tests.support.cluster import TrainerCluster


@pytest.fixture(scope="module")
def ddp_cluster() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=2, timeout_s=300.0) as cluster:
        yield cluster


def test_stream_weights_gathers_the_deferred_shards(ddp_cluster: TrainerCluster, catalog: str) -> None:
    built = ddp_cluster.run("tests.support.ddp_ops:build", timeout_s=300, catalog=catalog, name="ddp-cpu", tp=1,
                            overlap=True, cuda=False)  # fmt: skip
    for b in built:
        assert b["dp_size"] == 2 and b["buffers"] == 2 and b["bucket_groups"] > 1
        assert b["param_storages"] == 0  # every parameter is a view of a DDP param buffer
        assert b["registrations"] == b["buffers"]  # the buffers are registered as they are, not copied
    rcv = None
    try:
        for version in (1, 2):
            ranks = ddp_cluster.run("tests.support.ddp_ops:shard_step", timeout_s=120, version=version)
            for r in ranks:
                assert r["stale_before"] > 0  # publishing without the gather would expose the peer's old shard
                assert r["stale_after"] == 0
                assert r["pending_gathers"] == []
            if rcv is None:
                rcv = ddp_ops.receiver(catalog, "ddp-cpu", version, torch.device("cpu"))
            assert rcv.update_weights(version=version).version == version
            assert ddp_ops.differing(rcv, ranks[0]["truth"]) == []
            # The next forward uses these bytes as they are: its pre-hooks start no all-gather.
            for g in ddp_cluster.run("tests.support.ddp_ops:forward_gathers", timeout_s=120):
                assert g == {"started": [], "changed": 0}
    finally:
        if rcv is not None:
            rcv.close()
        ddp_cluster.run("tests.support.ddp_ops:close", timeout_s=60)
