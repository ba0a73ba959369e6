"""`refit-bench plan --row-blocks`: synthetic trainers that publish row-parallel shards as column blocks.

The blocked sources keep every byte where it was (only the descriptors change), and an engine at
four times the trainer's TP then reads each of its row-parallel slices in one descriptor instead of
one per row: the plan needs the same bytes from the same trainer ranks, in far fewer descriptors.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from refit.errors import ConfigError
from refit.plan.planner import plan_refit
from refit.types import Role
from refit_bench.cli import main
from refit_bench.cluster_model import EngineFleet, Fabric
from refit_bench.plan_presets import PRESETS
from refit_bench.trainer_sources import TrainerLayout, load_config, mirror_bytes, synthesize_sources

CFG = load_config("tiny-mla-moe")
TRAINER = TrainerLayout(tp=1, pp=2, ep=2, dp=2, gpus_per_node=4)
ROW_ROLES = {Role.ROW, Role.EXPERT_ROW}


def test_blocked_sources_cut_each_row_parallel_shard_in_place() -> None:
    _, plain = synthesize_sources(CFG, TRAINER)
    _, blocked = synthesize_sources(CFG, replace(TRAINER, row_blocks=4))
    for a, b in zip(plain, blocked, strict=True):
        assert a.regions == b.regions  # the same packing: a blocked tensor takes the bytes it took
        counts = Counter(d.name for d in b.tensors)
        rows = {d.name for d in a.tensors if d.role in ROW_ROLES}
        assert {n for n, c in counts.items() if c > 1} == rows and {counts[n] for n in rows} == {4}
        whole = {d.name: d for d in a.tensors}
        for d in b.tensors:
            if d.name in rows:  # block j: a quarter of the shard's columns and of its bytes, j quarters in
                w = whole[d.name]
                j = (d.offset - w.offset) // d.local_shape[1]
                assert d.local_shape == (w.local_shape[0], w.local_shape[1] // 4)
                assert d.byte_offset == w.byte_offset + j * w.nbytes // 4
            else:
                assert d == whole[d.name]
        assert mirror_bytes([b]) == [sum(whole[n].nbytes for n in rows)]
    assert mirror_bytes(plain) == [0] * len(plain)
    with pytest.raises(ConfigError, match="row_blocks"):
        TrainerLayout(row_blocks=0)


def test_engine_at_four_times_the_trainer_tp_reads_blocked_slices_in_one_descriptor() -> None:
    fleet = EngineFleet(tp=4, ep=1, replicas=1, gpus_per_node=4)
    fabric = Fabric()
    meta, plain = synthesize_sources(CFG, TRAINER)
    _, blocked = synthesize_sources(CFG, replace(TRAINER, row_blocks=4))
    for t in range(fleet.tp):
        # No hole read along, no enclosing block: every descriptor is the layout's own.
        args = dict(model=meta, layout=fleet.layout(t), stripe=fleet.stripe(0, t), cost=fabric.nic, max_gap=0,
                    max_overread=0)  # fmt: skip
        before, after = plan_refit(sources=plain, **args), plan_refit(sources=blocked, **args)
        assert after.bytes_by_rank == before.bytes_by_rank  # the same bytes, from the same ranks
        assert after.wire_bytes == after.total_bytes
        strided = [p for p in after.pieces if p.count > 1]
        assert strided == [] and any(p.count > 1 for p in before.pieces)
        assert after.descriptors < before.descriptors


def test_plan_cli_takes_row_blocks_and_reports_the_trainer_mirror(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    argv = ["plan", "--preset", "smoke", "--engine-tp", "4", "--engine-ep", "1", "--trainer-tp", "1",
            "--trainer-dp", "4", "--no-progress", "--no-stripe", "--json", str(out)]  # fmt: skip
    assert main([*argv, "--row-blocks", "4"]) == 0
    blocked = json.loads(out.read_text())["results"][0]
    assert main(argv) == 0
    plain = json.loads(out.read_text())["results"][0]
    assert blocked["trainer"]["row_blocks"] == 4 and plain["trainer"]["row_blocks"] == 1
    assert blocked["trainer_mirror_bytes_max"] > 0 == plain["trainer_mirror_bytes_max"]
    b, p = blocked["rows"][0], plain["rows"][0]
    assert b["needed_bytes"] == p["needed_bytes"]
    assert b["descriptors_per_engine_rank"]["max"] < p["descriptors_per_engine_rank"]["max"]


def test_blocked_deepseek_preset_is_the_published_layout_with_blocks() -> None:
    blocked, native = PRESETS["deepseek-v3-nemo-blocks"], PRESETS["deepseek-v3-nemo"]
    assert blocked.trainer == replace(native.trainer, row_blocks=32) and blocked.engine == native.engine
    assert blocked.anchor == native.anchor
