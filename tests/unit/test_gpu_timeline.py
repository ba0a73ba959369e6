"""`refit-bench refit --gpu-timeline`: each traced refit's GPU operations summarized from a Chrome trace.

The trace here is written by hand in the shape `torch.profiler.export_chrome_trace` writes (a CPU
annotation per refit, GPU operations on the same clock, in microseconds): the first operation's delay,
busy time as the union of operations on overlapping streams, idle gaps, the host's tail, and a
refit during which the profiler fetched activity buffers flagged and left out of the medians.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from refit_bench.cli import main
from refit_bench.gpu_timeline import Timeline, describe, medians, plot, summarize


def _mark(version: int, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "user_annotation", "name": f"refit-v{version}", "ts": ts, "dur": dur}


def _op(ts: float, dur: float, cat: str = "gpu_memcpy", stream: int = 7) -> dict:
    return {"ph": "X", "cat": cat, "name": "Memcpy DtoD (Device -> Device)", "ts": ts, "dur": dur,
            "args": {"stream": stream}}  # fmt: skip


TRACE = [
    _mark(2, 1000.0, 6000.0),
    _op(1700.0, 1000.0),  # first operation 700 us in
    _op(2500.0, 1000.0, stream=9),  # overlaps the first by 200 us: busy counts it once
    _op(3600.0, 400.0, cat="kernel"),  # after a 100 us gap
    _op(4000.0, 1500.0),  # ends at 5500: the host's tail is 1500 us
    {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 1200.0, "dur": 50.0},  # host work: not a GPU op
    _mark(3, 10000.0, 5000.0),
    _op(10500.0, 4000.0),
    {"ph": "X", "cat": "overhead", "name": "Activity Buffer Request", "ts": 14600.0, "dur": 2000.0},
    _mark(4, 20000.0, 5200.0),
    _op(20600.0, 4100.0),
    _op(30000.0, 10.0),  # outside every refit
    # kineto's projection of an annotation onto the GPU's timeline: not a refit of its own
    {"ph": "X", "cat": "gpu_user_annotation", "name": "refit-v2", "ts": 1700.0, "dur": 3800.0},
]


def test_each_refit_is_its_first_operation_busy_time_gaps_and_tail() -> None:
    got = summarize(TRACE)
    assert set(got) == {2, 3, 4}
    two = got[2]
    assert two["gpu_ops"] == 4 and not two["profiler_stall"]
    assert two["first_gpu_ms"] == pytest.approx(0.7)
    assert two["gpu_busy_ms"] == pytest.approx(3.7)  # 1.0 + 0.8 (beyond the overlap) + 0.4 + 1.5
    assert two["gpu_gaps_ms"] == pytest.approx(0.1)
    assert two["gpu_end_ms"] == pytest.approx(4.5)
    assert two["tail_ms"] == pytest.approx(1.5)
    assert two["end_to_end_ms"] == pytest.approx(6.0)
    assert got[3]["profiler_stall"] and not got[4]["profiler_stall"]
    assert got[4]["gpu_ops"] == 1 and got[4]["tail_ms"] == pytest.approx(0.5)


def test_medians_leave_out_refits_the_profiler_stalled() -> None:
    got = summarize(TRACE)
    m = medians(list(got.values()))
    assert m["end_to_end_ms"] == pytest.approx((6.0 + 5.2) / 2)  # refit 3 (stalled) is not among them
    assert m["first_gpu_ms"] == pytest.approx((0.7 + 0.6) / 2)
    assert medians([got[3]])["end_to_end_ms"] == pytest.approx(5.0)  # all stalled: all of them
    assert medians([{"end_to_end_ms": 1.0, "gpu_ops": 0, "profiler_stall": False}]) == {}  # no GPU work traced
    assert "first operation after 0.65 ms" in describe([m])


def test_a_refit_without_gpu_work_has_only_its_end_to_end() -> None:
    got = summarize([_mark(5, 0.0, 900.0), _op(1000.0, 5.0)])
    assert got == {5: {"end_to_end_ms": 0.9, "gpu_ops": 0, "profiler_stall": False}}


def test_the_last_refits_are_drawn(tmp_path) -> None:
    out = tmp_path / "timeline.png"
    plot(TRACE, str(out), last=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


@pytest.mark.filterwarnings("ignore")  # (torch warns that CUDA activity cannot be traced here)
def test_a_real_trace_marks_each_refit_and_keeps_the_trace_and_the_picture(tmp_path) -> None:
    # On CPU the profiler records no GPU operation: each refit has only its time, and the glue
    # (marks, export, summary, kept trace, picture) runs as on a GPU.
    timeline = Timeline()
    for version in (2, 3):
        with timeline.mark(version):
            torch.ones(1 << 16).sum()
    got = timeline.finish(str(tmp_path / "t.json.gz"), str(tmp_path / "t.png"))
    assert set(got) == {2, 3}
    assert all(r["gpu_ops"] == 0 and r["end_to_end_ms"] > 0 for r in got.values())
    with gzip.open(tmp_path / "t.json.gz", "rt") as f:
        assert summarize(json.load(f)["traceEvents"]) == got
    assert (tmp_path / "t.png").stat().st_size > 0


def test_the_timeline_needs_a_gpu(capsys) -> None:
    with pytest.raises(SystemExit, match="--gpu-timeline traces GPU operations: it needs --device cuda"):
        main(["refit", "--gpu-timeline", "--versions", "2"])
