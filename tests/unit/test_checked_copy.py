"""Direct reads copied out of the trainers' mapped regions and digested in the same pass
(refit/plan/checked_copy.py, refit/kernels/copy_sum.py).

On the CPU the copies and cell sums run as torch ops run by run (the GPU runs them as one Triton
kernel, tests/gpu/test_cuda_ipc.py); either way the engine tensors must hold the trainer's bytes of
each read (copied here by hand as the reference), the digests must equal those computed where the
bytes landed, and a changed byte must fail the check.
"""

from __future__ import annotations

import pytest
import torch

from refit.dtypes import torch_dtype
from refit.engines.base import EngineSpec
from refit.errors import DigestError
from refit.kernels import copy_sum
from refit.plan.planner import plan_refit
from refit.plan.verify import DigestIndex, Verifier
from refit.reads import batched
from tests.unit.test_digest import META, _memory, _sources

LAYOUTS = [  # trainer TP, DP, engine TP, engine rank
    pytest.param(1, 1, 1, 0, id="tp1-to-1"),
    pytest.param(2, 1, 1, 0, id="tp2-to-1"),
    pytest.param(1, 2, 2, 1, id="tp1-to-2"),
    pytest.param(2, 2, 4, 3, id="tp2-to-4"),
    pytest.param(4, 1, 2, 0, id="tp4-to-2"),
]


def _plan(tp: int, dp: int, engine_tp: int, rank: int):
    sources = _sources(tp, dp=dp)
    memory = {s.rank: _memory(s, 0) for s in sources}
    spec = EngineSpec.from_meta(META, tp_rank=rank, tp_size=engine_tp)
    plan = plan_refit(model=META, sources=sources, layout=spec.layout(), window=64 << 10,
                      direct=lambda t: True, direct_min_bytes=1)  # fmt: skip
    return sources, memory, plan


def _dests(plan) -> dict[str, torch.Tensor]:
    return {t.hf_name: torch.zeros(t.shape, dtype=torch_dtype(t.dtype)) for t in plan.targets}


def _reference(plan, memory) -> dict[str, torch.Tensor]:
    dests = _dests(plan)
    for d in plan.direct:
        dests[d.target].view(-1).view(torch.uint8)[d.offset : d.offset + d.nbytes] = memory[d.rank][
            d.remote_offset : d.remote_offset + d.nbytes
        ]
    return dests


@pytest.mark.parametrize(("tp", "dp", "engine_tp", "rank"), LAYOUTS)
def test_direct_reads_land_and_are_verified_in_one_pass(tp, dp, engine_tp, rank) -> None:
    sources, memory, plan = _plan(tp, dp, engine_tp, rank)
    assert plan.direct
    mapped = {(r, 0): m for r, m in memory.items()}
    groups = batched(plan.direct, 32 << 10)
    assert len(groups) > 1
    want = _reference(plan, memory)
    index = DigestIndex(sources)
    # The same bytes digested where they landed, the two-pass way: the digests to agree with.
    two_pass = Verifier(index, sources, version=1, batched=True)
    pending = [two_pass.launch_direct(g, want) for g in groups]
    dests = _dests(plan)
    one_pass = Verifier(index, sources, version=1, batched=True)
    assert all(one_pass.copier(g, dests, mapped) is not None for g in groups)
    got = [one_pass.copy_direct(g, dests, mapped) for g in groups]
    for a, b in zip(pending, got, strict=True):
        assert len(a.got) == len(b.got) and all(torch.equal(x, y) for x, y in zip(a.got, b.got, strict=True))
        one_pass.compare(b)
    for name, tensor in want.items():
        assert torch.equal(dests[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert one_pass.verified_bytes == two_pass.verified_bytes > 0
    assert one_pass.verified_bytes + one_pass.unverified_bytes == sum(d.nbytes for d in plan.direct)


@pytest.mark.parametrize(("tp", "dp", "engine_tp", "rank"), LAYOUTS)
@pytest.mark.parametrize("tensor", ["linear_qkv.weight", "linear_fc1.weight", "output_layer", "linear_proj.weight"])
def test_a_flipped_trainer_byte_fails_the_one_pass_check(tp, dp, engine_tp, rank, tensor) -> None:
    sources, memory, plan = _plan(tp, dp, engine_tp, rank)
    descs = {s.rank: s.tensors for s in sources}

    def holds(t, d) -> bool:
        return tensor in t.name and t.byte_offset <= d.remote_offset < t.byte_offset + t.nbytes

    hit = [d for d in plan.direct if any(holds(t, d) for t in descs[d.rank])]
    if not hit:
        pytest.skip(f"{tensor} is not read directly by this engine rank")
    d = hit[len(hit) // 2]
    memory[d.rank][d.remote_offset + d.nbytes // 2 + 3] ^= 0x20  # after the digests were published
    verifier = Verifier(DigestIndex(sources), sources, version=1, batched=True)
    mapped = {(r, 0): m for r, m in memory.items()}
    dests = _dests(plan)
    pending = verifier.copy_direct(plan.direct, dests, mapped)
    with pytest.raises(DigestError) as err:
        verifier.compare(pending)
    assert err.value.rank == d.rank


def test_the_copies_are_kept_until_an_engine_tensor_or_a_region_moves() -> None:
    sources, memory, plan = _plan(2, 1, 1, 0)
    mapped = {(r, 0): m for r, m in memory.items()}
    index = DigestIndex(sources)
    dests = _dests(plan)
    first = Verifier(index, sources, version=1, batched=True).copier(plan.direct, dests, mapped)
    again = Verifier(index, sources, version=1, batched=True).copier(plan.direct, dests, mapped)
    assert first is not None and again is first  # kept with the plan's layout
    moved = _dests(plan)  # new engine tensors
    renewed = Verifier(index, sources, version=1, batched=True).copier(plan.direct, moved, mapped)
    assert renewed is not None and renewed is not first
    verifier = Verifier(index, sources, version=1, batched=True)
    verifier.compare(verifier.copy_direct(plan.direct, moved, mapped))
    assert torch.equal(
        moved[plan.direct[0].target].view(torch.uint8),
        _reference(plan, memory)[plan.direct[0].target].view(torch.uint8),
    )
    copied = {k: v.clone() for k, v in mapped.items()}  # the trainer's regions mapped anew
    assert Verifier(index, sources, version=1, batched=True).copier(plan.direct, moved, copied) is not renewed


def test_a_batch_that_cannot_be_copied_in_one_pass_gets_none() -> None:
    sources, memory, plan = _plan(1, 1, 1, 0)
    verifier = Verifier(DigestIndex(sources), sources, version=1, batched=True)
    dests = _dests(plan)
    misaligned = {(r, 0): torch.empty(m.numel() + 8, dtype=torch.uint8)[8:] for r, m in memory.items()}
    assert all(m.data_ptr() % copy_sum.ALIGN for m in misaligned.values())
    assert verifier.copier(plan.direct, dests, misaligned) is None
    assert verifier.copier(plan.direct, dests, {}) is None  # a region not mapped here
    aligned = {(r, 0): m for r, m in memory.items()}
    strided = dict(dests)
    d = next(d for d in plan.direct if dests[d.target].dim() == 2)
    rows, cols = dests[d.target].shape
    strided[d.target] = torch.zeros(cols, rows, dtype=dests[d.target].dtype).t()  # not contiguous: no writes through it
    assert (
        Verifier(DigestIndex(sources), sources, version=1, batched=True).copier(plan.direct, strided, aligned) is None
    )
    per_run = Verifier(DigestIndex(sources), sources, version=1, batched=False)  # no batch: no cell sums
    assert per_run.copier(plan.direct, dests, {(r, 0): m for r, m in memory.items()}) is None


def test_copy_sum_runs_are_torchs_copies_and_sums() -> None:
    src = torch.randint(0, 256, (3 << 16,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    sums = torch.full((64,), 7, dtype=torch.int64)
    runs = [copy_sum.Run(src[:65536], dst[:65536], 0), copy_sum.Run(src[65536:65536 + 4096], dst[65536:65536 + 4096]),
            copy_sum.Run(src[1 << 17 :], dst[1 << 17 :], 16)]  # fmt: skip
    copy_sum.CopySum(runs, cell=4096).run(sums)
    assert torch.equal(dst[: 65536 + 4096], src[: 65536 + 4096]) and torch.equal(dst[1 << 17 :], src[1 << 17 :])
    words = src.view(torch.int64).view(-1, 512).sum(-1)
    assert torch.equal(sums[:16], words[:16]) and torch.equal(sums[16:32], words[32:48])
    assert torch.equal(sums[32:], torch.full((32,), 7, dtype=torch.int64))  # no run sums there
    with pytest.raises(ValueError, match="does not fit"):
        copy_sum.CopySum([copy_sum.Run(src[:1000], dst[:1000], 0)], cell=4096)


def test_the_kernel_is_not_used_off_a_gpu() -> None:
    assert not copy_sum.usable(torch.device("cpu"))  # the receiver copies and digests in two passes there
