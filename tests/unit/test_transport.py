"""The transport's pure half: read merging and the plan -> READ jobs translation (no NIXL involved)."""

from __future__ import annotations

import itertools

import pytest

from refit.errors import ConfigError, LayoutError
from refit.plan.planner import Plan, Read, plan_refit
from refit.plan.records import DirectRead
from refit.plan.targets import EngineLayout
from refit.transport.jobs import (
    ReadJob,
    ReadOp,
    descriptor_rows,
    direct_job_batches,
    direct_jobs,
    jobs_for,
    merge_reads,
)
from refit.transport.ucx import progress_delay_us
from refit.types import ParallelCoords, Region, SourceRecord
from tests.support import catalog_samples as samples

# -- merge_reads ------------------------------------------------------------------------------------


def test_ranges_adjacent_on_both_sides_merge_in_remote_order() -> None:
    ops = [
        ReadOp(local_addr=1100, remote_addr=5100, nbytes=50),
        ReadOp(local_addr=1000, remote_addr=5000, nbytes=100),
        ReadOp(local_addr=1150, remote_addr=5150, nbytes=10),
    ]
    assert merge_reads(ops) == [(1000, 5000, 160)]


def test_ranges_adjacent_on_one_side_only_stay_apart() -> None:
    remote_only = [
        ReadOp(local_addr=0, remote_addr=500, nbytes=100),
        ReadOp(local_addr=200, remote_addr=600, nbytes=100),
    ]
    assert merge_reads(remote_only) == [(0, 500, 100), (200, 600, 100)]
    local_only = [
        ReadOp(local_addr=0, remote_addr=500, nbytes=100),
        ReadOp(local_addr=100, remote_addr=700, nbytes=100),
    ]
    assert merge_reads(local_only) == [(0, 500, 100), (100, 700, 100)]


def test_strided_ops_expand_and_merge_where_their_blocks_touch() -> None:
    # Three blocks packed locally, taken every 1000 bytes remotely: nothing touches remotely.
    strided = ReadOp(local_addr=0, remote_addr=10_000, nbytes=64, count=3, local_stride=64, remote_stride=1000)
    assert merge_reads([strided]) == [(0, 10_000, 64), (64, 11_000, 64), (128, 12_000, 64)]
    # A remote stride equal to the block size is one contiguous range.
    dense = ReadOp(local_addr=0, remote_addr=10_000, nbytes=64, count=4, local_stride=64, remote_stride=64)
    assert merge_reads([dense]) == [(0, 10_000, 256)]


@pytest.mark.parametrize(
    "side",
    [
        # Two trainer registrations back to back in memory (Megatron DDP's fp32 and bf16 param buffers can be).
        "region",
        # Two engine tensors back to back in memory (two caching-allocator blocks), each its own registration.
        "local_region",
    ],
)
def test_ranges_of_two_adjacent_registrations_stay_apart(side: str) -> None:
    # One descriptor across both registrations would be rejected by NIXL, so touching ranges are not merged.
    ops = [
        ReadOp(local_addr=0, remote_addr=5000, nbytes=100, **{side: 0}),
        ReadOp(local_addr=100, remote_addr=5100, nbytes=100, **{side: 100}),
        ReadOp(local_addr=200, remote_addr=5200, nbytes=50, **{side: 100}),
    ]
    assert merge_reads(ops) == [(0, 5000, 100), (100, 5100, 150)]


def test_jobs_keep_reads_of_adjacent_regions_in_separate_descriptors() -> None:
    adjacent = record(
        1, (Region(index=0, addr=0x3000_0000, nbytes=256), Region(index=1, addr=0x3000_0000 + 256, nbytes=256))
    )
    plan = plan_of(
        Read(rank=1, region=0, remote_offset=192, local_offset=0, block_bytes=64),
        Read(rank=1, region=1, remote_offset=0, local_offset=64, block_bytes=64),
    )
    (job,) = jobs_for(plan, [adjacent], 0x9000, "cpu", 0)
    assert merge_reads(job.ops) == [(0x9000, 0x3000_0000 + 192, 64), (0x9000 + 64, 0x3000_0000 + 256, 64)]


def test_direct_reads_merge_within_an_engine_storage_only() -> None:
    src = record(1, (Region(index=0, addr=0x3000_0000, nbytes=1024),))
    reads = [  # gate and up halves of one remote tensor, into two engine tensors that touch
        DirectRead(target="gate", rank=1, region=0, remote_offset=0, nbytes=256),
        DirectRead(target="up", rank=1, region=0, remote_offset=256, nbytes=256),
        # two runs of one engine tensor (its two TP shards): one storage, so they still merge
        DirectRead(target="qkv", rank=1, region=0, remote_offset=512, nbytes=128),
        DirectRead(target="qkv", rank=1, region=0, remote_offset=640, nbytes=128, offset=128),
    ]
    where = {"gate": (0x9000, "cpu", 0, 0x9000), "up": (0x9100, "cpu", 0, 0x9100), "qkv": (0xA000, "cpu", 0, 0xA000)}
    (job,) = direct_jobs(reads, [src], where)
    assert merge_reads(job.ops) == [
        (0x9000, 0x3000_0000, 256),
        (0x9100, 0x3000_0000 + 256, 256),
        (0xA000, 0x3000_0000 + 512, 256),
    ]


def test_direct_batches_are_the_jobs_of_each_batch() -> None:
    srcs = [record(r, (Region(index=0, addr=0x1000_0000 * (r + 1), nbytes=4096),)) for r in (0, 1)]
    reads = [DirectRead(target=f"t{i}", rank=i % 2, region=0, remote_offset=256 * i, nbytes=256) for i in range(6)]
    where = {f"t{i}": (0x9000 + 0x1000 * i, "cpu", 0, 0x9000 + 0x1000 * i) for i in range(6)}
    batches = [reads[:1], reads[1:4], reads[4:]]
    assert direct_job_batches(batches, srcs, where) == [direct_jobs(b, srcs, where) for b in batches]
    assert [len(jobs) for jobs in direct_job_batches(batches, srcs, where)] == [1, 2, 2]  # one job per trainer rank


def test_zero_byte_ops_are_dropped() -> None:
    ops = [
        ReadOp(local_addr=0, remote_addr=0, nbytes=0),
        ReadOp(local_addr=0, remote_addr=100, nbytes=8, count=0),
        ReadOp(local_addr=8, remote_addr=300, nbytes=8),
    ]
    assert merge_reads(ops) == [(8, 300, 8)]
    assert merge_reads([]) == []


def test_descriptor_rows_are_the_merged_ranges_with_each_sides_device() -> None:
    ops = [ReadOp(local_addr=1000, remote_addr=5000, nbytes=100), ReadOp(local_addr=1100, remote_addr=5100, nbytes=50),
           ReadOp(local_addr=4000, remote_addr=9000, nbytes=8)]  # fmt: skip
    job = ReadJob(agent_name="t", ops=ops, local_device="cuda", local_device_id=1, remote_device="cuda",
                  remote_device_id=3)  # fmt: skip
    rows = descriptor_rows(job)
    assert rows is not None
    local, remote = rows
    assert local.dtype == remote.dtype == "uint64"
    assert local.tolist() == [[1000, 150, 1], [4000, 8, 1]]
    assert remote.tolist() == [[5000, 150, 3], [9000, 8, 3]]
    assert descriptor_rows(ReadJob(agent_name="t", ops=[ReadOp(local_addr=0, remote_addr=0, nbytes=0)])) is None


# -- jobs_for -----------------------------------------------------------------------------------------


def record(rank: int, regions: tuple[Region, ...]) -> SourceRecord:
    return SourceRecord(
        rank=rank, coords=ParallelCoords(dp_rank=rank, dp_size=4), agent_name=f"agent-{rank}", agent_metadata=b"m",
        regions=regions, tensors=(),
    )  # fmt: skip


SOURCES = [
    record(0, (Region(index=0, addr=0x1000_0000, nbytes=1 << 20),)),
    record(
        2,
        (
            Region(index=0, addr=0x7000_0000, nbytes=1 << 20, device="cuda", device_id=1),
            Region(index=1, addr=0x2000_0000, nbytes=1 << 20),
        ),
    ),
]


def plan_of(*reads: Read) -> Plan:
    return Plan(targets=(), pieces=(), reads=reads, staging_bytes=1 << 20, bytes_by_rank={})


def test_each_rank_and_remote_device_is_one_job_with_absolute_addresses() -> None:
    plan = plan_of(
        Read(rank=2, region=1, remote_offset=64, local_offset=0, block_bytes=32),
        Read(rank=0, region=0, remote_offset=0, local_offset=32, block_bytes=16, count=2, remote_stride=128),
        Read(rank=2, region=0, remote_offset=8, local_offset=64, block_bytes=8),
        Read(rank=2, region=1, remote_offset=512, local_offset=72, block_bytes=8),
    )
    jobs = jobs_for(plan, {s.rank: s for s in SOURCES}, 0x9000, "cuda", 3)
    assert [(j.agent_name, j.remote_device, j.remote_device_id) for j in jobs] == [
        ("agent-0", "cpu", 0),
        ("agent-2", "cpu", 0),
        ("agent-2", "cuda", 1),
    ]
    assert all((j.local_device, j.local_device_id) == ("cuda", 3) for j in jobs)
    assert jobs[0].ops == [
        ReadOp(local_addr=0x9000 + 32, remote_addr=0x1000_0000, nbytes=16, count=2, local_stride=16, remote_stride=128)
    ]
    assert jobs[1].ops == [
        ReadOp(local_addr=0x9000, remote_addr=0x2000_0000 + 64, nbytes=32, local_stride=32, region=1),
        ReadOp(local_addr=0x9000 + 72, remote_addr=0x2000_0000 + 512, nbytes=8, local_stride=8, region=1),
    ]
    assert jobs[2].ops == [ReadOp(local_addr=0x9000 + 64, remote_addr=0x7000_0000 + 8, nbytes=8, local_stride=8)]
    # A list of records works as well as a mapping by rank.
    assert jobs_for(plan, SOURCES, 0x9000, "cuda", 3) == jobs


def test_a_real_plan_reads_every_planned_byte_once_into_its_staging_place() -> None:
    sources = [samples.source(r, tp_size=2) for r in range(4)]
    plan = plan_refit(model=samples.MODEL, sources=sources, layout=EngineLayout(), stripe=1)
    jobs = jobs_for(plan, sources, 0, "cpu", 0)
    assert all(isinstance(j, ReadJob) for j in jobs)
    landed = sorted((local, n) for j in jobs for local, _, n in merge_reads(j.ops))
    assert sum(n for _, n in landed) == plan.wire_bytes
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(landed))  # no byte twice
    assert landed[-1][0] + landed[-1][1] <= plan.staging_bytes


def test_a_read_of_a_region_the_sources_lack_is_named() -> None:
    plan = plan_of(Read(rank=0, region=5, remote_offset=0, local_offset=0, block_bytes=8))
    with pytest.raises(LayoutError, match="region 5 of rank 0"):
        jobs_for(plan, SOURCES, 0, "cpu", 0)


# -- agent settings -------------------------------------------------------------------------------------


def test_the_progress_delay_is_read_when_asked_and_validated() -> None:
    assert progress_delay_us({}) == 1000
    assert progress_delay_us({"REFIT_NIXL_PROGRESS_DELAY_US": "0"}) == 0
    for bad in ("-1", "1.5", "soon"):
        with pytest.raises(ConfigError, match="REFIT_NIXL_PROGRESS_DELAY_US"):
            progress_delay_us({"REFIT_NIXL_PROGRESS_DELAY_US": bad})


def test_ucx_cuda_defaults_apply_only_with_a_gpu() -> None:
    """The cuda_ipc setting goes with a GPU torch sees: on a CPU-only host (even under PyPI's CUDA build
    of torch) UCX would warn on stdout about an unused variable."""
    import torch

    from refit.transport.ucx import UCX_CUDA_DEFAULTS, UCX_DEFAULTS, apply_ucx_defaults

    env: dict[str, str] = {}
    applied = apply_ucx_defaults(env)
    assert set(UCX_DEFAULTS) <= set(applied)
    assert (set(UCX_CUDA_DEFAULTS) <= set(env)) == torch.cuda.is_available()
    forced: dict[str, str] = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "n"}
    apply_ucx_defaults(forced, cuda=True)
    assert forced["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "n"  # what the user set stays
