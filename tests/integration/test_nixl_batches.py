"""`NixlAgent.read_batches`: batches pulled in order with a bounded number in flight, over real NIXL;
`landed(k)` reports each batch once its bytes are in place.

Two agents in one process (UCX loopback). Every other 4 KiB block of a source buffer is read; the
destination must hold exactly those blocks, whatever the depth and however the reads are cut.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from refit.errors import TransportError
from refit.transport.jobs import ReadJob, ReadOp
from refit.transport.nixl import NixlAgent

BLOCK, BLOCKS = 4096, 256


@pytest.fixture(scope="module")
def agents() -> Iterator[tuple[NixlAgent, NixlAgent, torch.Tensor, torch.Tensor]]:
    src = torch.randint(0, 256, (BLOCK * BLOCKS,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dst = torch.zeros_like(src)
    with NixlAgent(prefix="batches-reader") as reader, NixlAgent(prefix="batches-source") as source:
        source.register(src.data_ptr(), src.numel())
        reader.register(dst.data_ptr(), dst.numel())
        reader.connect(source.name, source.metadata())
        yield reader, source, src, dst


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("per_batch", [1, 7, 64, 1000])
def test_batches_land_every_read_and_nothing_else(agents, depth: int, per_batch: int) -> None:
    reader, source, src, dst = agents
    dst.zero_()
    wanted = range(0, BLOCKS, 2)
    ops = [ReadOp(local_addr=dst.data_ptr() + i * BLOCK, remote_addr=src.data_ptr() + i * BLOCK, nbytes=BLOCK)
           for i in wanted]  # fmt: skip
    batches = [[ReadJob(agent_name=source.name, ops=ops[i : i + per_batch])] for i in range(0, len(ops), per_batch)]
    batches.insert(1, [])  # an empty batch is allowed and posts nothing
    landed: list[tuple[int, bool]] = []  # (batch, whether its blocks were all in place when it was reported)

    def on_landed(k: int) -> None:
        done = [op for job in batches[k] for op in job.ops]
        at = [(op.local_addr - dst.data_ptr(), op.nbytes) for op in done]
        landed.append((k, all(torch.equal(dst[a : a + n], src[a : a + n]) for a, n in at)))

    assert reader.read_batches(batches, depth=depth, timeout_s=60, landed=on_landed) == len(ops)  # none adjacent
    assert landed == [(k, True) for k in range(len(batches))]  # each batch once, in order, after its bytes
    mask = torch.zeros(BLOCKS, dtype=torch.bool)
    mask[list(wanted)] = True
    mask = mask.repeat_interleave(BLOCK)
    assert torch.equal(dst[mask], src[mask])
    assert not dst[~mask].any()
    assert reader.in_flight() == 0


def test_kept_jobs_read_the_bytes_there_now(agents) -> None:
    # A receiver keeps a plan's jobs across refits and the agent keeps their NIXL descriptors: each
    # read of the same job objects must bring the source's bytes of that moment, not the first ones.
    reader, source, src, dst = agents
    ops = [ReadOp(local_addr=dst.data_ptr() + i * BLOCK, remote_addr=src.data_ptr() + i * BLOCK, nbytes=BLOCK)
           for i in range(0, BLOCKS, 3)]  # fmt: skip
    batches = [[ReadJob(agent_name=source.name, ops=ops[i : i + 10])] for i in range(0, len(ops), 10)]
    original = src.clone()
    try:
        for step in range(3):
            src.copy_(original.roll(step * 7))  # new bytes at the same addresses: the next version
            dst.zero_()
            assert reader.read_batches(batches, timeout_s=60) == len(ops)
            for op in ops:
                at = op.local_addr - dst.data_ptr()
                assert torch.equal(dst[at : at + BLOCK], src[at : at + BLOCK]), (step, at)
    finally:
        src.copy_(original)


def test_depth_must_be_positive(agents) -> None:
    reader, *_ = agents
    with pytest.raises(ValueError, match="depth"):
        reader.read_batches([], depth=0)


# -- registrations that touch in memory ---------------------------------------------------------------
# Megatron DDP's param buffers (and an engine's tensors) can be adjacent blocks of one allocator segment,
# each registered on its own. NIXL accepts no descriptor spanning two registrations: this is the
# `NIXL_ERR_NOT_FOUND` a GPU receiver met reading a DDP trainer rank before `merge_reads` kept reads
# of different regions apart (the bf16 buffer's last four tensors and the fp32 buffer after it, 428,544
# bytes in one descriptor).


@pytest.mark.parametrize("side", ["remote", "local"])
def test_reads_touching_two_registrations_stay_two_descriptors(side: str) -> None:
    half = 64 << 10
    src = torch.randint(0, 256, (2 * half,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    dst = torch.zeros_like(src)
    split, whole = [(0, half), (half, half)], [(0, 2 * half)]
    with NixlAgent(prefix="touch-reader") as reader, NixlAgent(prefix="touch-source") as source:
        for start, n in split if side == "remote" else whole:
            source.register(src.data_ptr() + start, n)
        for start, n in split if side == "local" else whole:
            reader.register(dst.data_ptr() + start, n)
        reader.connect(source.name, source.metadata())
        tag = "region" if side == "remote" else "local_region"
        ops = [
            ReadOp(local_addr=dst.data_ptr() + start, remote_addr=src.data_ptr() + start, nbytes=n, **{tag: i})
            for i, (start, n) in enumerate(split)
        ]
        assert reader.read([ReadJob(agent_name=source.name, ops=ops)], timeout_s=60) == 2
        assert torch.equal(dst, src)
        # The same bytes as one descriptor across the boundary: what merging them would post.
        spanning = ReadOp(local_addr=dst.data_ptr(), remote_addr=src.data_ptr(), nbytes=2 * half)
        with pytest.raises(TransportError, match="NIXL_ERR_NOT_FOUND"):
            reader.read([ReadJob(agent_name=source.name, ops=[spanning])], timeout_s=60)
        assert reader.in_flight() == 0
