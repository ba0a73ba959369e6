"""The DeepSeek-V3 ground truth: real megatron-core 0.16.1 GPTModels with multi-latent attention and
DeepSeek MoE layers (local spec with real q / kv latent norms, sigmoid router with expert bias and
grouped routing, one shared expert, a dense first layer; SequentialMLP experts, allgather dispatcher)
loaded by the test converter (tests/support/megatron_mla_convert.py) compute what the Hugging Face
`DeepseekV3ForCausalLM` they were converted from computes, at trainer TP, EP, ETP and PP, with and
without a query latent (`q_lora_rank`). docs/mla_conventions.md is the mapping this verifies.

Tolerance: fp32, |logits| < ~1; HF and Megatron differ by ~1e-6 (rounding of differently ordered
matmuls, TP all-gathers and all-reduces), so 1e-4 is 100x the noise and 100x below what any wrong
convention below changes (>= 1e-2, checked on HF itself). Routing is decisive (checked on the very
tokens used): the group and expert choices have sigmoid-score margins >= 1e-3, ~1000x the noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.support import hf_models as hm
from tests.support.cluster import TrainerCluster
from tests.support.ground_truth import OPS, Build, builder, hf_logits, max_diff, megatron_logits, write_state

ATOL = 1e-4
WRONG = 0.1  # less than any wrong convention below moves the logits by (1000x ATOL)
MIN_ROUTING_MARGIN = 1e-3


def routing_margins(model: torch.nn.Module) -> list[float]:
    """Per MoE layer: the smallest gap, over all tokens, at either choice HF's DeepSeek-V3 router makes:
    between the `topk_group`-th and next group score (sum of a group's top-2 biased sigmoid scores),
    and between the `top_k`-th and next biased score inside the chosen groups."""
    seen: list[float] = []

    def record(router: torch.nn.Module, args: tuple, _out: object) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        choice = torch.sigmoid(x @ router.weight.float().T) + router.e_score_correction_bias
        per_group = router.num_experts // router.num_group
        groups = choice.view(len(x), router.num_group, per_group).topk(2, dim=-1).values.sum(-1)
        ranked = groups.sort(dim=-1, descending=True).values
        group_gap = ranked[:, router.topk_group - 1] - ranked[:, router.topk_group]
        kept = torch.zeros_like(groups).scatter(1, groups.topk(router.topk_group, dim=-1).indices, 1).bool()
        masked = choice.masked_fill(~kept.repeat_interleave(per_group, dim=1), float("-inf"))
        ranked = masked.sort(dim=-1, descending=True).values
        expert_gap = ranked[:, router.top_k - 1] - ranked[:, router.top_k]
        seen.append(float(torch.minimum(group_gap, expert_gap).min()))

    hooks = [m.register_forward_hook(record) for n, m in model.named_modules() if n.endswith(".mlp.gate")]
    try:
        hf_logits(model)
    finally:
        for h in hooks:
            h.remove()
    assert seen, "no router ran"
    return seen


@pytest.fixture
def built(trainer_cluster: TrainerCluster, tmp_path: Path) -> Iterator[Build]:
    """Build models on the shared cluster; drop them afterwards."""
    yield from builder(trainer_cluster, tmp_path, "gt-mla")


LAYOUTS = [
    pytest.param(hm.DEEPSEEK_V3, 1, 2, None, 1, id="deepseek-v3-tp1-ep2"),
    pytest.param(hm.DEEPSEEK_V3, 2, 2, 1, 1, id="deepseek-v3-tp2-ep2-etp1"),
    pytest.param(hm.DEEPSEEK_V3, 1, 2, None, 2, id="deepseek-v3-pp2-ep2"),
    pytest.param(hm.DEEPSEEK_V3_NO_QLORA, 2, 2, 2, 1, id="deepseek-v3-no-qlora-tp2-ep2-etp2"),
    pytest.param(hm.DEEPSEEK_V3_NO_QLORA, 2, 2, 1, 2, id="deepseek-v3-no-qlora-tp2-pp2-ep2"),
]


@pytest.mark.parametrize(("case", "tp", "ep", "etp", "pp"), LAYOUTS)
def test_mla_megatron_logits_match_hf_for_two_versions(
    trainer_cluster, built, tmp_path, case: hm.ModelCase, tp: int, ep: int, etp: int | None, pp: int
) -> None:
    world = trainer_cluster.world_size
    v1 = hm.build_hf_model(case, seed=1)
    key, summaries = built(case, v1.state_dict(), tp=tp, ep=ep, etp=etp, pp=pp)

    per_rank = case.num_experts // ep
    moe_layers = {i for i, moe in enumerate(case.moe_layers) if moe}
    assert moe_layers == set(range(1, case.num_layers))  # first_k_dense_replace = 1
    for s in summaries:
        (layers,) = s["layers"]
        assert layers == list(range(s["pp_rank"] * case.num_layers // pp, (s["pp_rank"] + 1) * case.num_layers // pp))
        owned = list(range(s["ep_rank"] * per_rank, (s["ep_rank"] + 1) * per_rank))
        assert s["local_experts"] == [{layer: owned for layer in layers if layer in moe_layers}]
    if pp > 1:  # the first stage holds the dense layer and a MoE layer
        assert {layer for s in summaries if s["pp_rank"] == 0 for layer in s["layers"][0]} == {0, 1}

    assert min(routing_margins(v1)) > MIN_ROUTING_MARGIN
    want1 = hf_logits(v1)
    got1 = megatron_logits(trainer_cluster, key)
    assert len(got1) == world // (tp * pp)  # one per data-parallel replica
    assert max_diff(got1, want1) <= ATOL

    # Version 2 in place: every element of every tensor moves, the expert-bias buffers too.
    v2 = hm.build_hf_model(case, seed=1)
    v2.load_state_dict(hm.perturbed_state_dict(v2.state_dict(), seed=2))
    assert min(routing_margins(v2)) > MIN_ROUTING_MARGIN
    loaded = trainer_cluster.run(
        f"{OPS}:load", key=key, hf_path=write_state(v2.state_dict(), tmp_path / "v2.safetensors")
    )
    for stage in range(pp):  # every replica of a stage updates the same number of tensors
        assert len({r["updated"] for r, s in zip(loaded, summaries, strict=True) if s["pp_rank"] == stage}) == 1
    want2 = hf_logits(v2)
    got2 = megatron_logits(trainer_cluster, key)
    assert max_diff(got2, want2) <= ATOL
    assert max_diff(got2, want1) > WRONG


# --- each convention the converter follows is visible in the logits ------------------------------
# A converter that got one of these wrong would load Megatron with the HF model changed as below;
# these changes move HF's own logits by far more than ATOL, so the match above rules each one out.


def _per_head(weight: torch.Tensor, heads: int, split: list[int], swap: bool) -> torch.Tensor:
    """Rows of `weight` viewed per head as parts of sizes `split`; `swap` puts the second part first."""
    parts = weight.view(heads, sum(split), -1).split(split, dim=1)
    return torch.cat(parts[::-1] if swap else parts, dim=1).reshape(weight.shape)


def _q_rows(attn: torch.nn.Module) -> torch.nn.Linear:
    return attn.q_b_proj if attn.q_b_proj is not None else attn.q_proj


def _swap_k_and_v(model: torch.nn.Module, c: dict) -> None:
    for layer in model.model.layers:
        kv_b = layer.self_attn.kv_b_proj.weight
        kv_b.copy_(_per_head(kv_b, c["num_attention_heads"], [c["qk_nope_head_dim"], c["v_head_dim"]], True))


def _rope_first_in_q(model: torch.nn.Module, c: dict) -> None:
    for layer in model.model.layers:
        q = _q_rows(layer.self_attn).weight
        q.copy_(_per_head(q, c["num_attention_heads"], [c["qk_nope_head_dim"], c["qk_rope_head_dim"]], True))


def _rope_first_in_kv_a(model: torch.nn.Module, c: dict) -> None:
    for layer in model.model.layers:
        kv_a = layer.self_attn.kv_a_proj_with_mqa.weight
        kv_a.copy_(torch.cat([kv_a[c["kv_lora_rank"] :], kv_a[: c["kv_lora_rank"]]]))


def _rope_pairs_as_halves(model: torch.nn.Module, c: dict) -> None:
    """The rope rows of q and of kv_a de-interleaved (evens, then odds), as a converter between the
    interleaved and the half-split RoPE conventions would do."""
    rope, nope = c["qk_rope_head_dim"], c["qk_nope_head_dim"]
    perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    for layer in model.model.layers:
        q = _q_rows(layer.self_attn).weight
        heads = q.view(c["num_attention_heads"], nope + rope, -1)
        heads[:, nope:] = heads[:, nope:][:, perm].clone()
        kv_a = layer.self_attn.kv_a_proj_with_mqa.weight
        kv_a[c["kv_lora_rank"] :] = kv_a[c["kv_lora_rank"] :][perm].clone()


def _no_latent_norms(model: torch.nn.Module, c: dict) -> None:
    for layer in model.model.layers:
        for norm in (layer.self_attn.q_a_layernorm, layer.self_attn.kv_a_layernorm):
            if norm is not None:
                norm.weight.fill_(1.0)


def _no_expert_bias(model: torch.nn.Module, c: dict) -> None:
    for layer in model.model.layers[c["first_k_dense_replace"] :]:
        layer.mlp.gate.e_score_correction_bias.zero_()


def _swap_experts_across_groups(model: torch.nn.Module, c: dict) -> None:
    last = c["n_routed_experts"] - 1
    for layer in model.model.layers[c["first_k_dense_replace"] :]:
        for param in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            param[[0, last]] = param[[last, 0]].clone()


WRONG_CONVENTIONS: dict[str, Callable[[torch.nn.Module, dict], None]] = {
    "v-before-k-in-kv_b": _swap_k_and_v,
    "rope-before-nope-in-q": _rope_first_in_q,
    "rope-before-latent-in-kv_a": _rope_first_in_kv_a,
    "rope-half-split-not-interleaved": _rope_pairs_as_halves,
    "latent-norms-dropped": _no_latent_norms,
    "expert-bias-dropped": _no_expert_bias,
    "experts-swapped": _swap_experts_across_groups,
}


@pytest.mark.parametrize("case", hm.MLA_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("wrong", list(WRONG_CONVENTIONS))
def test_logits_see_each_mla_convention(case: hm.ModelCase, wrong: str) -> None:
    base = hf_logits(hm.build_hf_model(case, seed=1))
    model = hm.build_hf_model(case, seed=1)
    with torch.no_grad():
        WRONG_CONVENTIONS[wrong](model, case.hf_config)
    assert float((hf_logits(model) - base).abs().max()) > WRONG


def test_hf_rope_interleave_is_what_megatron_computes() -> None:
    """Megatron's MLA rotates interleaved pairs (it de-interleaves before a half-split rotation): that is
    HF's `rope_interleave=True`. The half-split HF variant computes something else from the same weights."""
    model = hm.build_hf_model(hm.DEEPSEEK_V3, seed=1)
    base = hf_logits(model)
    model.config.rope_interleave = False
    assert float((hf_logits(model) - base).abs().max()) > WRONG
