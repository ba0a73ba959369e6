"""The mixture-of-experts ground truth: real megatron-core MoE GPTModels (local spec, SequentialMLP
experts, allgather dispatcher) loaded by the test converter compute what the Hugging Face Qwen3-MoE,
Mixtral and Qwen2-MoE models they were converted from compute, under expert parallelism (EP), expert
tensor parallelism (ETP, independent of TP) and pipeline stages that hold dense and MoE layers.

The cases route decisively (router weights drawn large, checked below on the very tokens used), so a
logits match is a statement about every expert's weights, not about a lucky tie-break.

Dropping a model frees the process groups of layouts no stored model uses (tests/support/layouts.py):
before that, these eight layouts left ~360 threads per idle trainer process, ~10% of a core each, and
the suite after them ran 29 minutes instead of 11. The last test checks nothing is left behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.support import hf_models as hm
from tests.support.cluster import ClusterError, TrainerCluster
from tests.support.ground_truth import OPS, Build, builder, hf_logits, max_diff, megatron_logits, write_state

ATOL = {"float32": 1e-4, "bfloat16": 3e-2}
# k-th vs (k+1)-th router logit (|router logits| ~ 10): far above the fp32 rounding noise between HF
# and Megatron (~1e-5), so no token can pick other experts. The MoE cases are fp32 (see hf_models).
MIN_ROUTER_MARGIN = 1e-3


def router_margins(model: torch.nn.Module, topk: int) -> list[float]:
    """Per MoE layer: the smallest gap between the k-th and (k+1)-th router logit over all tokens."""
    seen: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple, _out: object) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        seen.append((x @ module.weight.float().T).sort(dim=-1, descending=True).values)

    hooks = [m.register_forward_hook(record) for n, m in model.named_modules() if n.endswith(".mlp.gate")]
    try:
        hf_logits(model)
    finally:
        for h in hooks:
            h.remove()
    assert seen, "no router ran"
    return [float((s[:, topk - 1] - s[:, topk]).min()) for s in seen]


def expert_coords(rank: int, *, ep: int, etp: int, pp: int, world: int) -> tuple[int, int, int, int]:
    """(etp, ep, edp, pp) rank of a global rank: Megatron's expert RankGenerator, order tp-cp-ep-dp-pp,
    with ETP in the tp slot: rank = etp + ETP * (ep + EP * (edp + EDP * pp))."""
    edp = world // (etp * ep * pp)
    return rank % etp, rank // etp % ep, rank // (etp * ep) % edp, rank // (etp * ep * edp)


@pytest.fixture
def built(trainer_cluster: TrainerCluster, tmp_path: Path) -> Iterator[Build]:
    """Build models on the shared cluster; drop them afterwards."""
    yield from builder(trainer_cluster, tmp_path, "gt-moe")


LAYOUTS = [
    pytest.param(hm.QWEN3_MOE, 1, 2, None, 1, id="qwen3-moe-tp1-ep2"),
    pytest.param(hm.QWEN2_MOE, 2, 2, 1, 1, id="qwen2-moe-shared-tp2-ep2-etp1"),
    pytest.param(hm.MIXTRAL, 1, 4, 2, 1, id="mixtral-tp1-ep4-etp2"),
    pytest.param(hm.QWEN3_MOE, 2, 2, 1, 2, id="qwen3-moe-tp2-ep2-etp1-pp2"),
    pytest.param(hm.QWEN2_MOE, 1, 2, 2, 2, id="qwen2-moe-shared-tp1-ep2-etp2-pp2"),
    pytest.param(hm.QWEN3_MOE, 2, 1, None, 1, id="qwen3-moe-tp2-ep1-etp2"),
    pytest.param(hm.MIXTRAL, 2, 4, 1, 1, id="mixtral-tp2-ep4-etp1"),
    pytest.param(hm.QWEN2_MOE, 1, 4, 2, 1, id="qwen2-moe-shared-tp1-ep4-etp2"),
]


@pytest.mark.parametrize(("case", "tp", "ep", "etp", "pp"), LAYOUTS)
def test_moe_megatron_logits_match_hf_for_two_versions(
    trainer_cluster, built, tmp_path, case: hm.ModelCase, tp: int, ep: int, etp: int | None, pp: int
) -> None:
    world = trainer_cluster.world_size
    etp_size = tp if etp is None else etp
    v1 = hm.build_hf_model(case, seed=1)
    key, summaries = built(case, v1.state_dict(), tp=tp, ep=ep, etp=etp, pp=pp)

    per_rank = case.num_experts // ep
    moe_layers = [i for i, moe in enumerate(case.moe_layers) if moe]
    dense_layers = [i for i, moe in enumerate(case.moe_layers) if not moe]
    for rank, s in enumerate(summaries):
        etp_rank, ep_rank, edp_rank, pp_rank = expert_coords(rank, ep=ep, etp=etp_size, pp=pp, world=world)
        assert (s["etp_rank"], s["ep_rank"], s["edp_rank"], s["pp_rank"]) == (etp_rank, ep_rank, edp_rank, pp_rank)
        (layers,) = s["layers"]
        assert layers == list(range(pp_rank * case.num_layers // pp, (pp_rank + 1) * case.num_layers // pp))
        owned = list(range(ep_rank * per_rank, (ep_rank + 1) * per_rank))
        assert s["local_experts"] == [{layer: owned for layer in layers if layer in moe_layers}], rank
    if pp > 1 and dense_layers:  # the stage boundary cuts across both kinds of layer
        for stage in range(pp):
            held = {layer for s in summaries if s["pp_rank"] == stage for layer in s["layers"][0]}
            assert held & set(moe_layers) and held & set(dense_layers), (stage, held)

    assert min(router_margins(v1, case.moe_topk)) > MIN_ROUTER_MARGIN
    atol = ATOL[case.dtype]
    want1 = hf_logits(v1)
    got1 = megatron_logits(trainer_cluster, key)
    assert len(got1) == world // (tp * pp)  # one per data-parallel replica
    assert max_diff(got1, want1) <= atol

    # Version 2 in place: every element of every tensor (router, experts, shared expert, gate) moves.
    v2 = hm.build_hf_model(case, seed=1)
    v2.load_state_dict(hm.perturbed_state_dict(v2.state_dict(), seed=2))
    assert min(router_margins(v2, case.moe_topk)) > MIN_ROUTER_MARGIN
    loaded = trainer_cluster.run(
        f"{OPS}:load", key=key, hf_path=write_state(v2.state_dict(), tmp_path / "v2.safetensors")
    )
    for stage in range(pp):  # every replica of a stage updates the same number of parameters
        assert len({r["updated"] for r, s in zip(loaded, summaries, strict=True) if s["pp_rank"] == stage}) == 1
    want2 = hf_logits(v2)
    got2 = megatron_logits(trainer_cluster, key)
    assert max_diff(got2, want2) <= atol
    assert max_diff(got2, want1) > 0.1 > 3 * atol


@pytest.mark.parametrize("case", [hm.QWEN3_MOE, hm.MIXTRAL, hm.QWEN2_MOE], ids=lambda c: c.id)
def test_logits_see_which_expert_is_which(case: hm.ModelCase) -> None:
    """A converter that put expert 0's weights under expert 1 would be caught: swapping two experts
    (or negating the shared expert gate) changes the HF logits far beyond the tolerance."""
    model = hm.build_hf_model(case, seed=1)
    base = hf_logits(model)
    layer = next(i for i, moe in enumerate(case.moe_layers) if moe)
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        for param in (mlp.experts.gate_up_proj, mlp.experts.down_proj):
            param[[0, 1]] = param[[1, 0]].clone()
    assert float((hf_logits(model) - base).abs().max()) > 0.1
    if case.shared_expert_ffn_size:
        model = hm.build_hf_model(case, seed=1)
        with torch.no_grad():
            model.model.layers[layer].mlp.shared_expert_gate.weight.mul_(-1)
        assert float((hf_logits(model) - base).abs().max()) > 0.1


def test_expert_layouts_that_do_not_fit_are_refused_clearly(trainer_cluster, tmp_path) -> None:
    path = write_state(hm.build_hf_model(hm.QWEN3_MOE, seed=1).state_dict(), tmp_path / "moe.safetensors")
    with pytest.raises(ClusterError, match=r"4 experts do not split over EP=8"):
        trainer_cluster.run(f"{OPS}:build", key="gt-moe-bad", case=hm.QWEN3_MOE.id, hf_path=path, tp=1, ep=8)
    with pytest.raises(ClusterError, match=r"has no experts"):
        trainer_cluster.run(f"{OPS}:build", key="gt-moe-bad", case=hm.LLAMA_4L.id, hf_path=path, tp=1, ep=2)
    assert all("gt-moe-bad" not in p["keys"] for p in trainer_cluster.run(f"{OPS}:ping"))


def test_dropping_models_frees_their_layouts_process_groups(trainer_cluster, built) -> None:
    """Idle trainer processes hold no process group of a layout no model uses: only the world's."""
    key, _ = built(hm.MIXTRAL, hm.build_hf_model(hm.MIXTRAL, seed=1).state_dict(), tp=2, ep=2, etp=1, pp=2)
    held = trainer_cluster.run("tests.support.trainer_ops:resources")
    assert all(r["process_groups"] > 1 and r["layouts"] for r in held)
    trainer_cluster.run(f"{OPS}:drop", key=key)
    if any(p["keys"] for p in trainer_cluster.run(f"{OPS}:ping")):
        pytest.skip("another model is still stored on the cluster")
    for r in trainer_cluster.run("tests.support.trainer_ops:resources"):
        assert r["process_groups"] == 1 and r["layouts"] == [], r["process_groups"]
        assert r["threads"] < 64, r["thread_names"]
