"""Smoke runs of `refit-bench transport` and `refit-bench refit`: they work and print sane numbers.

Real processes, real NIXL, a real catalog; no timing is asserted, only that the figures are
physically sensible (positive rates, the right byte counts, registrations reused).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from refit_bench.synthetic import SHAPES

pytestmark = pytest.mark.slow


def bench(*args: str, timeout: float = 600) -> dict:
    """Run `refit-bench` in a subprocess; its JSON goes to a file (engines may log to stdout)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        proc = subprocess.run(
            [sys.executable, "-m", "refit_bench.cli", *args, "--json", str(path)],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "GB/s" in proc.stdout or "stall" in proc.stdout  # the readable table was printed too
        return json.loads(path.read_text())


def test_transport_reports_every_path_beside_its_ceiling(tmp_path: Path) -> None:
    out = bench(
        "transport", "--sizes", "1M,4M", "--iters", "2", "--descriptors", "16", "--plot", str(tmp_path / "t.png")
    )
    whats = {r["what"] for r in out["rows"]}
    assert {
        "memcpy (1 thread)",
        "NIXL READ",
        "NIXL READ (16 descriptors)",
        "torch.distributed broadcast (gloo)",
    } <= whats
    assert {r["bytes"] for r in out["rows"]} == {1 << 20, 4 << 20}
    for r in out["rows"]:
        assert r["gbps"] > 0 and r["best_gbps"] >= r["gbps"] and r["vs_ceiling"] > 0
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_refit_reports_phases_bytes_and_references(tmp_path: Path) -> None:
    out = bench("refit", "--shape", "llama-tiny", "--tp", "2", "--dp", "2", "--engine-tp", "2", "--versions", "3",
                "--iters", "1", "--plot", str(tmp_path / "r.png"))  # fmt: skip
    rows = out["versions"]
    assert [r["version"] for r in rows] == [1, 2, 3]
    shape = SHAPES["llama-tiny"]
    for r in rows:
        # Engine TP 2: each receiver needs about half of the bf16 model (norms are whole on both).
        assert 0.45 * shape.num_params * 2 < r["bytes_per_receiver"] < 0.6 * shape.num_params * 2
        assert r["wire_bytes_per_receiver"] >= r["bytes_per_receiver"]
        assert r["wire_s"] > 0 and r["stall_s"] > 0 and r["publish_s"] > 0
        # End to end as the receivers time it: within what the driver saw, and at least the stall.
        assert r["stall_s"] <= r["refit_s"] <= r["driver_s"]
        # Digests: computed on every trainer rank, every pulled byte verified on the receivers.
        assert r["digest_s"] > 0 and r["verify_s"] > 0
        assert r["verified_bytes"] > 0 and r["unverified_bytes"] < r["bytes_per_receiver"] // 10
    assert out["summary"]["digest_publish_share"] > 0 and out["summary"]["digest_verify_share"] > 0
    # Memory is registered once: later refits add no registration on either side.
    assert len({(r["trainer_registrations"], r["receiver_registrations"]) for r in rows[1:]}) == 1
    assert rows[1]["trainer_registrations"] == rows[0]["trainer_registrations"]
    whats = [r["what"] for r in out["references"]]
    assert whats == ["memcpy (1 thread)", "NIXL READ", "classic: gather on rank 0 + broadcast"]
    assert out["summary"]["gbps"] > 0 and all(r["refit_vs"] > 0 for r in out["references"])
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_moe_refit_with_engine_ep_moves_each_receiver_only_its_experts() -> None:
    out = bench("refit", "--shape", "moe-tiny", "--tp", "1", "--ep", "2", "--dp", "2", "--engine-tp", "2",
                "--engine-ep", "2", "--versions", "2", "--iters", "1", "--no-baseline")  # fmt: skip
    shape = SHAPES["moe-tiny"]
    h = shape.hidden_size
    experts = shape.num_layers * shape.num_experts * 3 * shape.moe_ffn_hidden_size * h * 2  # bf16
    for r in out["versions"]:
        # Half of the experts, and about half of the dense part (engine TP 2): never the other experts.
        assert r["bytes_per_receiver"] < (shape.num_params * 2 - experts) * 0.6 + experts / 2
        assert r["bytes_per_receiver"] > experts / 2
    assert out["config"]["engine_ep"] == 2 and out["summary"]["gbps"] > 0


def test_an_engine_in_megatron_layout_reads_every_tensor_straight_from_the_trainer() -> None:
    # Megatron's in-framework inference at the trainer's TP: every tensor is one contiguous run of the
    # trainer's memory in the engine's own layout, so every byte is read straight into the engine and
    # nothing is staged; the HF layout's QKV is un-interleaved on the way in, one read per query group.
    args = ("--shape", "llama-tiny", "--tp", "1", "--engine-tp", "1", "--versions", "2", "--iters", "1",
            "--no-baseline", "--direct-min-bytes", "0")  # fmt: skip
    megatron, hf = bench("refit", *args, "--engine-scheme", "megatron"), bench("refit", *args)
    assert megatron["config"]["engine_scheme"] == "megatron" and hf["config"]["engine_scheme"] == "hf"
    for r in megatron["versions"]:
        assert r["direct_bytes"] == r["bytes_per_receiver"] == SHAPES["llama-tiny"].num_params * 2
        assert r["staging_bytes"] == 0 and r["unverified_bytes"] == 0
    for m, h in zip(megatron["versions"], hf["versions"], strict=True):
        assert m["descriptors"] < h["descriptors"]


@pytest.mark.vllm
def test_vllm_mode_reports_stall_apart_from_wire() -> None:
    pytest.importorskip("vllm")
    out = bench("vllm", "--shape", "llama-tiny", "--tp", "2", "--engine-tp", "1", "--versions", "2")
    rows = out["versions"]
    assert [r["version"] for r in rows] == [1, 2]
    for r in rows:
        assert r["bytes_per_rank"] == [out["model_bytes"]]  # engine TP 1: the whole bf16 model
        assert 0 < r["wire_s"] <= r["prefetch_s"] and r["stall_s"] > 0
        assert r["tokens_changed"]  # every version changes every weight, so greedy tokens move
