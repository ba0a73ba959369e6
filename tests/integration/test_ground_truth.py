"""The ground truth itself: real megatron-core GPTModels loaded by the test converter compute what
the Hugging Face models they were converted from compute, and hold the layers they should.

Everything the refit tests trust is established here: the converter (by logits through the real
model, over TP 1/2/4, GQA with groups < TP, qkv bias, qk-norm, tied and padded vocabularies, bf16), the
in-place `load` of a second version, the PP / VPP layer placement, and the trainer cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import hf_models as hm
from tests.support.cluster import ClusterError, TrainerCluster
from tests.support.ground_truth import OPS, Build, builder, hf_logits, max_diff, megatron_logits, write_state

ATOL = {"float32": 1e-4, "bfloat16": 3e-2}  # bf16: a few ulps at |logit| ~ 1


@pytest.fixture
def built(trainer_cluster: TrainerCluster, tmp_path: Path) -> Iterator[Build]:
    """Build models on the shared cluster; drop them afterwards."""
    yield from builder(trainer_cluster, tmp_path, "gt")


LOGIT_CASES = [
    pytest.param(hm.LLAMA_GQA, 1, id="llama-gqa-tp1"),
    pytest.param(hm.LLAMA_GQA, 2, id="llama-gqa-tp2"),
    pytest.param(hm.LLAMA_GQA, 4, id="llama-gqa-tp4-groups-lt-tp"),
    pytest.param(hm.QWEN2_BIAS, 2, id="qwen2-bias-tp2"),
    pytest.param(hm.QWEN3_QKNORM, 2, id="qwen3-qknorm-tp2"),
    pytest.param(hm.QWEN3_QKNORM, 4, id="qwen3-qknorm-tp4"),
    pytest.param(hm.LLAMA_1KV_TIED, 2, id="llama-1kv-tied-tp2"),
    pytest.param(hm.LLAMA_PADDED, 2, id="llama-padded-vocab-tp2"),
    pytest.param(hm.LLAMA_BF16, 2, id="llama-gqa-bf16-tp2"),
]


@pytest.mark.parametrize(("case", "tp"), LOGIT_CASES)
def test_megatron_logits_match_hf_for_two_versions(
    trainer_cluster, built, tmp_path, case: hm.ModelCase, tp: int
) -> None:
    v1 = hm.build_hf_model(case, seed=1)
    key, summaries = built(case, v1.state_dict(), tp=tp, pp=1)
    dp = trainer_cluster.world_size // tp
    assert [s["tp_rank"] for s in summaries] == [r % tp for r in range(trainer_cluster.world_size)]
    assert all(s["layers"] == [list(range(case.num_layers))] for s in summaries)

    want1 = hf_logits(v1)
    got1 = megatron_logits(trainer_cluster, key)
    assert len(got1) == dp
    atol = ATOL[case.dtype]
    assert max_diff(got1, want1) <= atol

    # Version 2 loaded in place into the same parameters: still exact, and visibly different from v1.
    v2 = hm.build_hf_model(case, seed=1)
    v2.load_state_dict(hm.perturbed_state_dict(v2.state_dict(), seed=2))
    loaded = trainer_cluster.run(
        f"{OPS}:load", key=key, hf_path=write_state(v2.state_dict(), tmp_path / "v2.safetensors")
    )
    assert len({r["updated"] for r in loaded}) == 1
    want2 = hf_logits(v2)
    got2 = megatron_logits(trainer_cluster, key)
    assert max_diff(got2, want2) <= atol
    assert max_diff(got2, want1) > 0.1 > 3 * atol  # the comparison is sensitive to the weights


def expected_param_count(case: hm.ModelCase, tp: int) -> int:
    """Parameters of one model replica: every HF parameter once, norms once per TP rank (they are
    replicated), plus the zero padding rows of the vocab tables."""
    named = dict(hm.build_hf_model(case, seed=0).named_parameters())
    norms = sum(p.numel() for n, p in named.items() if "norm" in n)
    tables = 1 if case.tied else 2
    padding = tables * (hm.padded_vocab(case, tp) - case.vocab_size) * case.hidden_size
    return sum(p.numel() for p in named.values()) + (tp - 1) * norms + padding


PIPELINE_LAYOUTS = [
    pytest.param(1, 2, None, id="tp1-pp2"),
    pytest.param(2, 2, None, id="tp2-pp2"),
    pytest.param(4, 2, None, id="tp4-pp2"),
    pytest.param(1, 2, 2, id="tp1-pp2-vpp2"),
    pytest.param(2, 2, 2, id="tp2-pp2-vpp2"),
]


@pytest.mark.parametrize(("tp", "pp", "vpp"), PIPELINE_LAYOUTS)
def test_pipeline_stages_hold_the_expected_global_layers(
    trainer_cluster, built, tp: int, pp: int, vpp: int | None
) -> None:
    case = hm.LLAMA_4L
    _, summaries = built(case, hm.build_hf_model(case, seed=1).state_dict(), tp=tp, pp=pp, vpp=vpp)
    world = trainer_cluster.world_size
    dp = world // (tp * pp)
    chunks = vpp or 1
    per_chunk = case.num_layers // (pp * chunks)
    for rank, s in enumerate(summaries):
        # Megatron's default order is tp-cp-ep-dp-pp: tp varies fastest, pp slowest.
        assert (s["tp_rank"], s["dp_rank"], s["pp_rank"]) == (rank % tp, rank // tp % dp, rank // (tp * dp))
        pp_rank = s["pp_rank"]
        # Chunk k of stage p holds the (k * pp + p)-th run of `per_chunk` layers.
        want = [list(range((k * pp + pp_rank) * per_chunk, (k * pp + pp_rank + 1) * per_chunk)) for k in range(chunks)]
        assert s["layers"] == want, (rank, s)
        assert s["pre_process"] == [pp_rank == 0 and k == 0 for k in range(chunks)]
        assert s["post_process"] == [pp_rank == pp - 1 and k == chunks - 1 for k in range(chunks)]
    # One data-parallel replica holds every weight once (TP shards and stages together), norms per TP rank.
    replica = [s for s in summaries if s["dp_rank"] == 0]
    assert sum(s["params"] for s in replica) == expected_param_count(case, tp)


def test_tied_embeddings_with_pipeline_parallel_are_refused_clearly(trainer_cluster, tmp_path) -> None:
    case = hm.LLAMA_1KV_TIED
    path = write_state(hm.build_hf_model(case, seed=1).state_dict(), tmp_path / "tied.safetensors")
    with pytest.raises(ClusterError, match="tied embeddings with PP=2 cannot run on CPU"):
        trainer_cluster.run(f"{OPS}:build", key="gt-tied-pp", case=case.id, hf_path=path, tp=1, pp=2)
    assert all("gt-tied-pp" not in p["keys"] for p in trainer_cluster.run(f"{OPS}:ping"))


# --- the cluster itself -----------------------------------------------------------------------


def test_cluster_runs_every_rank_in_order_single_threaded(trainer_cluster) -> None:
    out = trainer_cluster.run(f"{OPS}:ping")
    world = trainer_cluster.world_size
    assert [p["rank"] for p in out] == list(range(world))
    assert {p["world_size"] for p in out} == {world}
    assert {p["threads"] for p in out} == {1}
    assert sorted(p["pid"] for p in out) == sorted(trainer_cluster.pids)


def test_cluster_reports_every_failing_rank_and_stays_usable(trainer_cluster) -> None:
    with pytest.raises(ClusterError) as info:
        trainer_cluster.run(f"{OPS}:fail", ranks=[1, 3], message="boom-from-test")
    text = str(info.value)
    assert "failed on ranks [1, 3]" in text
    assert "--- rank 1 ---" in text and "--- rank 3 ---" in text and "--- rank 0 ---" not in text
    assert text.count("RuntimeError: boom-from-test") == 2
    assert trainer_cluster.run(f"{OPS}:fail", ranks=[], message="") == list(range(trainer_cluster.world_size))


def test_cluster_that_times_out_names_the_silent_ranks_and_is_killed() -> None:
    with TrainerCluster(world_size=2, timeout_s=120) as cluster:
        # Rank 1 sleeps far past pytest's 600 s timeout, so this call can only end by its own 2 s deadline,
        # and the error names that deadline: no stopwatch needed.
        with pytest.raises(ClusterError, match=r"ranks \[1\] no answer within 2s"):
            cluster.run(f"{OPS}:sleep", timeout_s=2, ranks=[1], seconds=3600)
        with pytest.raises(ClusterError, match="not usable"):
            cluster.run(f"{OPS}:ping")
        assert not any(Path(f"/proc/{pid}").exists() for pid in cluster.pids)  # killed and reaped
