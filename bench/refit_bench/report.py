"""Output shared by the benchmark modes: the machine line, plain tables, JSON files and plots."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

import torch


def machine(device: str) -> dict[str, Any]:
    """What a reader needs to judge a figure: where and when it was measured."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        from importlib.metadata import version

        info["nixl"] = version("nixl")
    except Exception:  # noqa: BLE001 - the version is informative only
        pass
    return info


def machine_line(m: dict[str, Any]) -> str:
    where = ", ".join(m.get("gpus", [])) or f"{m['host_cpus']} CPU cores"
    return f"{m['date']}  {where}  torch {m['torch']}  python {m['python']}"


def size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} B"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=False)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=2, sort_keys=False)
    if path == "-":
        sys.stdout.write(text + "\n")
        return
    with open(path, "w") as f:
        f.write(text + "\n")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_transport(result: dict[str, Any], path: str) -> None:
    """GB/s against size, one line per path; the ceiling dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    paths: dict[str, list[tuple[int, float]]] = {}
    for r in result["rows"]:
        paths.setdefault(r["what"], []).append((r["bytes"], r["gbps"]))
    for i, (what, pts) in enumerate(paths.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot([x / (1 << 20) for x in xs], ys, marker="o", linestyle="--" if i == 0 else "-", label=what)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("transfer size (MiB)")
    ax.set_ylabel("GB/s")
    ax.set_title(f"refit-bench transport ({machine_line(result['machine'])})", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_refit(result: dict[str, Any], path: str) -> None:
    """Bars: the refit's GB/s beside the ceiling, the raw NIXL READ and the classic baseline."""
    plt = _pyplot()
    refs = [(b["what"], b["gbps"]) for b in result["references"]]
    summary = result["summary"]
    bars = [refs[0], ("refit: wire", summary["wire_gbps"]), ("refit: end to end", summary["gbps"]), *refs[1:]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names, values = zip(*bars, strict=True)
    colors = ["#999999", "#1f77b4", "#6baed6", *["#ff7f0e", "#ffbb78", "#fdd0a2", "#bbbbbb"][: len(values) - 3]]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (bytes per receiver / wall time)")
    ax.set_title(f"refit-bench refit {result['config']['shape']} ({machine_line(result['machine'])})", fontsize=8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
