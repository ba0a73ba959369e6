"""`refit-bench plan` smoke: it runs on small presets and its numbers add up (no timing assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from refit.errors import ConfigError
from refit.plan.planner import plan_refit, stripe
from refit.types import Role
from refit_bench.cli import main
from refit_bench.cluster_model import EngineFleet, Fabric, Traffic, simulate
from refit_bench.plan_presets import PRESETS
from refit_bench.trainer_sources import TrainerLayout, global_tensors, load_config, model_bytes, synthesize_sources


def _run(tmp_path: Path, *extra: str) -> dict:
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "plan.json"
    assert main(["plan", "--preset", "smoke", "smoke-dense", "--no-progress", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_plan_smoke_bytes_add_up_and_the_busiest_nic_is_above_the_bound(tmp_path: Path) -> None:
    doc = _run(tmp_path)
    assert doc["mode"] == "plan" and [r["scenario"] for r in doc["results"]] == ["smoke", "smoke-dense"]
    for result in doc["results"]:
        replicas = result["engine"]["replicas"]
        assert [r["label"] for r in result["rows"]] == ["striped", "first replica"]
        for row in result["rows"]:
            # Wire bytes: what is needed, plus holes and enclosing blocks the planner read along.
            assert row["bytes_sent"] == row["bytes_received"] >= row["needed_bytes"] == row["target_bytes"] > 0
            assert sum(row["nic_bytes_sent"]) == row["bytes_sent"]  # not colocated: everything crosses NICs
            assert row["modelled_s"] >= row["modelled_bytes_only_s"] >= row["lower_bound_s"] > 0
            assert row["modelled_s"] - row["modelled_bytes_only_s"] <= row["descriptor_s"] * (1 + 1e-9)
            assert row["descriptors_per_engine_rank"]["max"] >= row["descriptors_per_engine_rank"]["mean"] >= 1
            assert row["most_loaded_nic"]["bytes"] == max(row["nic_bytes_sent"] + row["nic_bytes_received"])
        if result["engine"]["tp"] == 1:  # no TP copies of replicated tensors: exactly the model, per replica
            assert result["rows"][0]["needed_bytes"] == result["model_bytes"] * replicas
        else:
            assert result["rows"][0]["needed_bytes"] > result["model_bytes"] * replicas
    striped, first = doc["results"][0]["rows"]
    assert max(striped["nic_bytes_sent"]) <= max(first["nic_bytes_sent"])


@pytest.mark.parametrize("name", ["smoke", "smoke-dense"])
@pytest.mark.parametrize("stripe", [True, False], ids=["striped", "first-replica"])
def test_plan_reuse_across_replicas_matches_planning_every_rank(name: str, stripe: bool) -> None:
    # The bytes each engine rank needs from each trainer rank are exact by symmetry. Holes read along
    # depend on which neighbours striping moves to other replicas, so wire bytes are not; `--exact`.
    scenario = PRESETS[name]
    meta, sources = synthesize_sources(load_config(scenario.model), scenario.trainer)
    runs = [
        simulate(
            model=meta,
            sources=sources,
            trainer_gpus_per_node=4,
            engine=scenario.engine,
            fabric=Fabric(),
            stripe=stripe,
            exact=exact,
        )
        for exact in (False, True)
    ]
    assert runs[0].per_pair == runs[1].per_pair
    assert runs[0].needed_nic_bytes == runs[1].needed_nic_bytes


def test_plan_writes_a_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    assert main(["plan", "--preset", "smoke", "--no-progress", "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("model", "billions"),
    [("deepseek-v3", 671.0), ("kimi-k2", 1026.4), ("qwen3-235b-a22b", 235.1), ("llama-3-70b", 70.6)],
)
def test_model_configs_have_their_published_parameter_counts(model: str, billions: float) -> None:
    params = sum(math.prod(t.shape) for t in global_tensors(load_config(model), 1))
    assert params / 1e9 == pytest.approx(billions, abs=0.1)


def test_synthesized_sources_hold_dense_weights_dp_times_and_experts_edp_times() -> None:
    cfg = load_config("tiny-mla-moe")
    layout = TrainerLayout(tp=2, pp=2, ep=2, dp=2)
    meta, sources = synthesize_sources(cfg, layout)
    assert len(sources) == layout.world and meta.num_experts == 8 and meta.padded_vocab_size == 1024
    total = sum(d.nbytes for s in sources for d in s.tensors)
    tensors = global_tensors(cfg, layout.pp)
    vocab = {t.name: t for t in tensors if t.role is Role.VOCAB_PARALLEL}
    padding = sum((1024 - t.shape[0]) * t.shape[1] * 2 for t in vocab.values())
    experts = sum(math.prod(t.shape) * 2 for t in tensors if t.expert >= 0)
    dense = model_bytes(cfg) + padding - experts
    replicated = sum(
        math.prod(t.shape) * (4 if t.dtype == "float32" else 2) for t in tensors if t.role is Role.REPLICATED
    )
    # Dense: DP copies, replicated tensors on every TP rank too; experts: EDP (= 2) copies.
    assert total == layout.dp * (dense + (layout.tp - 1) * replicated) + layout.edp * experts
    for s in sources:  # one region per rank, shards packed back to back
        assert s.regions[0].nbytes == sum(d.nbytes for d in s.tensors)


@pytest.mark.parametrize("exact", [False, True], ids=["reused", "exact"])
def test_each_engine_rank_reads_what_a_receiver_with_the_library_stripe_reads(exact: bool) -> None:
    scenario = PRESETS["smoke"]  # 2 replicas of TP 2: the stripe rule decides which trainer copy serves whom
    fleet = scenario.engine
    assert fleet.tp > 1 and fleet.replicas > 1
    meta, sources = synthesize_sources(load_config(scenario.model), scenario.trainer)
    traffic = simulate(model=meta, sources=sources, trainer_gpus_per_node=4, engine=fleet, fabric=Fabric(), exact=exact)
    for replica in range(fleet.replicas):
        for tp_rank in range(fleet.tp):
            plan = plan_refit(
                model=meta,
                sources=sources,
                layout=fleet.layout(tp_rank),
                stripe=stripe(replica=replica, tp_rank=tp_rank, tp_size=fleet.tp),
                cost=Fabric().nic,  # the benchmark plans for its NIC
            )
            engine_gpu = replica * fleet.tp + tp_rank
            modelled = {t: n for (t, g), n in traffic.per_pair.items() if g == engine_gpu}
            assert modelled == plan.bytes_by_rank, (replica, tp_rank)
            if exact:  # what moves, and how many descriptors, are the plan's own
                wire = {t: n for (t, g), n in traffic.per_pair_wire.items() if g == engine_gpu}
                assert wire == plan.wire_by_rank, (replica, tp_rank)
                assert traffic.descriptors[engine_gpu] == plan.descriptors, (replica, tp_rank)
                assert traffic.staging[engine_gpu] == plan.staging_bytes


def test_modelled_time_is_the_slowest_link_with_the_engine_ranks_descriptors() -> None:
    # 1 GB/s NICs and 1 us a descriptor; one trainer GPU sending 1,000 bytes, two engine GPUs.
    fabric = Fabric(nic_gbps=1.0, nic_descriptor_us=1.0)
    traffic = Traffic(
        sent=[1000], received=[500, 500], nvlink_sent=[0], nvlink_received=[0, 0], descriptors=[400, 2],
        nvlink_descriptors=[0, 0], staging=[600, 500], needed_nic_bytes=900, target_bytes=900, reads=3, planned=2,
        plan_seconds=0.0,
    )  # fmt: skip
    assert traffic.engine_seconds(fabric) == pytest.approx([500e-9 + 400e-6, 500e-9 + 2e-6])
    assert traffic.seconds(fabric) == pytest.approx(500e-9 + 400e-6)
    assert traffic.seconds(fabric, descriptors=False) == pytest.approx(1000e-9)  # the trainer NIC
    assert traffic.descriptor_seconds(fabric) == pytest.approx(400e-6)
    assert traffic.lower_bound(fabric) == pytest.approx(900e-9)  # needed bytes over the one trainer NIC


def test_engine_fleet_is_checked_by_the_library_layout() -> None:
    with pytest.raises(ConfigError, match="tp_rank"):
        EngineFleet(tp=0)
    with pytest.raises(ConfigError, match="ep_rank"):
        EngineFleet(ep=0)
    with pytest.raises(ConfigError, match="unknown engine scheme"):
        EngineFleet(scheme="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="multiple of EP"):
        EngineFleet(tp=3, ep=2)
    with pytest.raises(ConfigError, match="replicas"):
        EngineFleet(replicas=0)
    assert EngineFleet(scheme="hf").layout(0).scheme.value == "hf"  # type: ignore[arg-type]
