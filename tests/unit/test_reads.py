"""A streamed plan's READ jobs, built once and kept (refit/reads.py): the same jobs as built afresh,
kept while the plan, the trainers' regions and the engine tensors stay, rebuilt when one changes.
"""

from __future__ import annotations

import dataclasses

import torch

from refit.dtypes import torch_dtype
from refit.plan.assemble import padding
from refit.plan.planner import plan_refit
from refit.plan.targets import EngineLayout
from refit.reads import PreparedReads, batch_bytes, batched, chunk_jobs
from refit.transport.jobs import direct_job_batches
from tests.unit.test_assemble import global_tensors, meta, trainer

VOCAB, PADDED = 61, 64


def _setup(tp: int = 2):
    sources, _ = trainer(global_tensors(PADDED), tp)
    plan = plan_refit(model=meta(VOCAB, PADDED), sources=sources, layout=EngineLayout(vocab_size=VOCAB), window=1024,
                      direct=lambda t: True, direct_min_bytes=1)  # fmt: skip
    dests = {t.hf_name: torch.zeros(t.shape, dtype=torch_dtype(t.dtype)) for t in plan.targets}
    return plan, sources, dests


def test_kept_jobs_are_the_jobs_built_afresh() -> None:
    plan, sources, dests = _setup()
    assert plan.direct and len(plan.chunks) > 2  # both kinds of read
    reads = PreparedReads(plan, sources, dests)
    where = {
        t: (d.data_ptr(), "cpu", 0, d.untyped_storage().data_ptr())
        for t, d in dests.items()
    }  # fmt: skip
    cut = batched(plan.direct, batch_bytes(plan))
    assert reads.direct_reads == cut
    assert reads.batches == direct_job_batches(cut, sources, where)
    slots = [torch.empty(1024, dtype=torch.uint8) for _ in range(2)]
    for k in range(len(plan.chunks)):
        jobs = reads.chunk(k, slots[k % 2])
        assert jobs == chunk_jobs(plan.chunks[k], sources, slots[k % 2])
        assert reads.chunk(k, slots[k % 2]) is jobs  # kept
        assert reads.chunk(k, slots[(k + 1) % 2]) == chunk_jobs(plan.chunks[k], sources, slots[(k + 1) % 2])
    assert {id(t) for t in reads.storages} == {id(dests[d.target]) for d in plan.direct}
    assert reads.padding == padding(plan.targets)


def test_kept_jobs_fit_only_the_same_plan_regions_and_engine_tensors() -> None:
    plan, sources, dests = _setup()
    reads = PreparedReads(plan, sources, dests)
    assert reads.fits(plan, sources, dests)
    assert reads.fits(plan, list(sources), dict(dests))  # equal records and the same tensors, new containers
    other, _, _ = _setup()
    assert not reads.fits(other, sources, dests)  # another plan object (a new layout or dead sources)
    moved_region = [dataclasses.replace(s, regions=(dataclasses.replace(s.regions[0], addr=8192),)) for s in sources]
    assert not reads.fits(plan, moved_region, dests)  # a trainer re-registered its memory elsewhere
    renamed = [dataclasses.replace(s, agent_name=s.agent_name + "-restarted") for s in sources]
    assert not reads.fits(plan, renamed, dests)
    target = plan.direct[0].target
    assert not reads.fits(plan, sources, dict(dests, **{target: dests[target].clone()}))  # an engine tensor moved
    assert not reads.fits(plan, sources, {k: v for k, v in dests.items() if k != target})
