"""Where a refit's time goes on the GPU: each refit of an engine process (its `update_weights()`, or
`fetch()` and `install()` with `--split`), traced with CUPTI (`torch.profiler`), as the delay to its
first GPU operation, the GPU's busy time and idle gaps once it has begun, and the host's tail after
the last operation ends.

`refit-bench refit --gpu-timeline` (CUDA only) traces every refit after the first in each receiver
process. The profiler costs the host side some time (CUPTI intercepts every CUDA call, such as each of
UCX's copy and event posts), so the end-to-end figures of such a run are slower than an untraced run's,
and where the GPU waits for the host's posts its gaps are longer; the operations themselves are timed
as they ran. A refit during which the profiler stopped to fetch activity buffers (its "Activity Buffer
Request" events, which stall the process for 2-3 ms) is marked `profiler_stall` and left out of the
medians.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

GPU_CATEGORIES = ("gpu_memcpy", "gpu_memset", "kernel")
MARK = "refit-v"  # the annotation around each traced refit, followed by its version
FIELDS = ("first_gpu_ms", "gpu_busy_ms", "gpu_gaps_ms", "gpu_end_ms", "tail_ms", "end_to_end_ms")


class Timeline:
    """A CUPTI trace of the refits of one process: `mark(version)` around each; `finish()` summarizes."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self._prof.__enter__()

    @contextlib.contextmanager
    def mark(self, version: int) -> Iterator[None]:
        import torch

        with torch.profiler.record_function(f"{MARK}{version}"):
            yield

    def finish(self, trace_path: str | None = None, plot_path: str | None = None) -> dict[int, dict[str, Any]]:
        """Stop tracing; each marked refit's timeline by version (`summarize`). `trace_path`: also keep
        the Chrome trace there, gzipped; `plot_path`: draw the last refits there (`plot`)."""
        self._prof.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            self._prof.export_chrome_trace(raw)
            with open(raw) as f:
                events = json.load(f)["traceEvents"]
            if trace_path:
                with open(raw, "rb") as src, gzip.open(trace_path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if plot_path:
            plot(events, plot_path)
        return summarize(events)


def attach(
    receivers: Sequence[Any], rows: Sequence[dict[str, Any]], json_path: str | None, plot_path: str | None
) -> None:
    """Each refit's timeline in every receiver process (`Worker`s of `refit_ranks.ReceiverRank`), as
    `rows[k]["gpu"][i]` (receiver i's; {} untraced). With a JSON path the trace of receiver i is kept
    as `json_path.trace<i>.json.gz`; with a plot path (`x.png`) its last refits are drawn as
    `x.timeline<i>.png`."""
    stem = os.path.splitext(plot_path)[0] if plot_path else None
    got = [w.call(cmd="timeline", trace=f"{json_path}.trace{i}.json.gz" if json_path else None,
                  plot=f"{stem}.timeline{i}.png" if stem else None)
           for i, w in enumerate(receivers)]  # fmt: skip
    for row in rows:
        row["gpu"] = [g["refits"].get(str(row["version"]), {}) for g in got]  # (keys of JSON: strings)


def summarize(events: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per marked refit: ms from its start to its first GPU operation, the GPU's busy and idle time
    from then to its last operation's end, that end, the host's tail after it, and the whole."""
    marks, gpu = _marks(events), _gpu_ops(events)
    stalls = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("name") == "Activity Buffer Request"]
    out: dict[int, dict[str, Any]] = {}
    for m in marks:
        start, end = m["ts"], m["ts"] + m["dur"]
        ops = [e for e in gpu if start <= e["ts"] < end]
        row: dict[str, Any] = {"end_to_end_ms": m["dur"] / 1e3, "gpu_ops": len(ops),
                               "profiler_stall": any(a < end and b > start for a, b in stalls)}  # fmt: skip
        if ops:
            busy = idle = 0.0
            reached = ops[0]["ts"]
            for e in ops:  # busy is the union of the operations' spans, so overlapping streams count once
                idle += max(e["ts"] - reached, 0.0)
                busy += max(e["ts"] + e["dur"] - max(e["ts"], reached), 0.0)
                reached = max(reached, e["ts"] + e["dur"])
            row.update(first_gpu_ms=(ops[0]["ts"] - start) / 1e3, gpu_busy_ms=busy / 1e3, gpu_gaps_ms=idle / 1e3,
                       gpu_end_ms=(reached - start) / 1e3, tail_ms=max(end - reached, 0.0) / 1e3)  # fmt: skip
        out[int(str(m["name"])[len(MARK) :])] = row
    return out


def _marks(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The annotations of traced refits, in time order (kineto also projects each onto the GPU's
    timeline, as "gpu_user_annotation": not a refit of its own)."""
    marks = (e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(MARK))
    return sorted(marks, key=lambda e: e["ts"])


def _gpu_ops(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e), key=lambda e: e["ts"])


def medians(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each field's median over the refits the profiler did not stall (all of them if it stalled each)."""
    traced = [r for r in rows if "gpu_busy_ms" in r]
    kept = [r for r in traced if not r["profiler_stall"]] or traced
    return {k: statistics.median(r[k] for r in kept) for k in FIELDS} if kept else {}


def plot(events: Sequence[dict[str, Any]], path: str, *, title: str = "", last: int = 4) -> None:
    """The `last` marked refits, one row each, in ms from the call's start: the call on the host (grey),
    its GPU copies (blue) and kernels (orange) on top, so the delay to the first operation, the gaps
    and the tail are seen at a glance."""
    from refit_bench.report import _pyplot

    marks, gpu = _marks(events)[-last:], _gpu_ops(events)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.55 * max(len(marks), 1)))
    for row, m in enumerate(marks):
        start, end = m["ts"], m["ts"] + m["dur"]
        ax.broken_barh([(0, m["dur"] / 1e3)], (row - 0.4, 0.8), color="#dddddd")
        for cat, color in (("gpu_memcpy", "#1f77b4"), ("kernel", "#ff7f0e"), ("gpu_memset", "#2ca02c")):
            ops = [e for e in gpu if e["cat"] == cat and start <= e["ts"] < end]
            spans = [((e["ts"] - start) / 1e3, e["dur"] / 1e3) for e in ops]
            ax.broken_barh(spans, (row - 0.25, 0.5), color=color, label=cat if row == 0 else None)
    ax.set_yticks(range(len(marks)), [str(m["name"]).replace(MARK, "v") for m in marks], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms from the call's start (grey: the call on the host)")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title or "refit on the GPU's timeline", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(per_receiver: Sequence[dict[str, float]]) -> str:
    """One line per receiver: its medians, as `refit-bench refit` prints them."""
    out = []
    for i, m in enumerate(per_receiver):
        if m:
            out.append(
                f"receiver {i} on the GPU (medians, profiled): first operation after {m['first_gpu_ms']:.2f} ms, "
                f"busy {m['gpu_busy_ms']:.2f} ms, idle gaps {m['gpu_gaps_ms']:.2f} ms, last one ends at "
                f"{m['gpu_end_ms']:.2f} ms, host tail {m['tail_ms']:.2f} ms, end to end {m['end_to_end_ms']:.2f} ms"
            )
    return "\n".join(out)
