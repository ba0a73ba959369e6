"""`refit-bench plan`: cluster-scale refit planning with the library's real planner, on real model shapes.

Trainer sources are synthesized from a model config (no weights) and a Megatron layout, or, with
`--from-reader`, read by the library's own Megatron reader from a meta-device GPTModel of that config
(`reader_sources`: multi-latent attention models; the plan a user's publisher gets); every engine
rank is planned with `refit.plan.planner.plan_refit` (one plan per engine position, reused across
replicas by symmetry unless `--exact`). Printed per scenario: bytes sent and received per NIC, the
most loaded NIC, descriptors per engine rank (max and mean) and the most time an engine rank spends
on them, the modelled refit time (the slowest link: bytes over bandwidth, plus the engine side's
descriptors), the lower bound (needed NIC bytes over the aggregate NIC bandwidth of the busier
side), with source striping and with every byte taken from the first replica, and the published
anchor beside them. Each engine rank is planned for the NIC's cost (`refit.plan.cost`), so the
planner reads small holes along and strided slices as their enclosing block where that is cheaper.

Examples:
    refit-bench plan --preset deepseek-v3-nemo deepseek-v3-nemo-blocks
    refit-bench plan --preset deepseek-v3-nemo --row-blocks 32 --engine-replicas 1
    refit-bench plan --preset deepseek-v3-nemo-blocks kimi-k2-miles --from-reader
    refit-bench plan --preset kimi-k2-pplx deepseek-v3-nemo kimi-k2-miles --json out.json --plot out.png
    refit-bench plan --model llama-3-70b --trainer-tp 8 --trainer-pp 4 --trainer-dp 4 --engine-tp 8 --engine-replicas 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import subprocess
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from refit.plan.cost import IB_RAIL
from refit.plan.planner import MAX_OVERREAD
from refit.plan.targets import Scheme
from refit_bench.cluster_model import EngineFleet, Fabric, Traffic, simulate
from refit_bench.plan_presets import PRESETS, Scenario
from refit_bench.reader_sources import reader_sources
from refit_bench.reader_sources import supports as supports_reader
from refit_bench.trainer_sources import (
    TrainerLayout,
    available_models,
    load_config,
    mirror_bytes,
    model_bytes,
    synthesize_sources,
    tensors_bytes,
)

logger = logging.getLogger(__name__)
GB = 1e9


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan",
        help="cluster-scale refit planning with the real planner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), help="published-anchor scenarios to run")
    p.add_argument("--model", help=f"model config for a custom scenario: {available_models()} or a JSON path")
    for side, what in (("trainer", ("tp", "pp", "ep", "etp", "dp")), ("engine", ("tp", "ep", "replicas"))):
        for f in (*what, "gpus-per-node"):
            p.add_argument(f"--{side}-{f}", type=int, help=f"{side} {f} (overrides the preset)")
    p.add_argument(
        "--row-blocks",
        type=int,
        metavar="K",
        help="trainer publishes row-parallel shards in K column blocks: Publisher(row_blocks=K) (overrides the preset)",
    )
    p.add_argument("--scheme", choices=[s.value for s in Scheme], help="engine target names (default megatron)")
    p.add_argument("--wire-dtype", help="dtype of GEMM weights on the wire, e.g. float8_e4m3fn (default: bf16)")
    p.add_argument("--nic-gbps", type=float, default=50.0, help="GB/s per GPU NIC per direction (default 50)")
    p.add_argument("--nvlink-gbps", type=float, default=450.0, help="GB/s NVLink per GPU per direction (450)")
    p.add_argument(
        "--descriptor-us",
        type=float,
        default=IB_RAIL.descriptor_s * 1e6,
        help=f"us per descriptor an engine rank posts over its NIC (default {IB_RAIL.descriptor_s * 1e6:g}, IB rail)",
    )
    p.add_argument(
        "--max-overread",
        type=float,
        default=MAX_OVERREAD,
        help=f"staging the planner may add for enclosing blocks, per needed byte (default {MAX_OVERREAD:g})",
    )
    p.add_argument(
        "--from-reader",
        action="store_true",
        help="trainer descriptors from refit.megatron's reader over a meta-device GPTModel (MLA models; "
        "default: the synthetic generator)",
    )
    p.add_argument("--colocated", action="store_true", help="trainer and engine GPU i share a node")
    p.add_argument("--no-stripe", action="store_true", help="only the first-replica row (no striping)")
    p.add_argument("--exact", action="store_true", help="plan every engine rank (no reuse across replicas)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write the JSON (to stdout if no PATH)")
    p.add_argument("--plot", metavar="PNG", help="write a PNG: times vs lower bound and anchor, NIC loads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _scenario(args: argparse.Namespace, base: Scenario | None) -> Scenario:
    if base is None:
        if not args.model:
            raise SystemExit("refit-bench plan: give --preset or --model")
        base = Scenario(name="custom", model=args.model, trainer=TrainerLayout(), engine=EngineFleet())
    t = {f: getattr(args, f"trainer_{f.replace('-', '_')}") for f in ("tp", "pp", "ep", "etp", "dp", "gpus_per_node")}
    e = {f: getattr(args, f"engine_{f}") for f in ("tp", "ep", "replicas", "gpus_per_node")}
    t["row_blocks"] = args.row_blocks
    if args.scheme:
        e["scheme"] = Scheme(args.scheme)
    return replace(
        base,
        model=args.model or base.model,
        trainer=replace(base.trainer, **{k: v for k, v in t.items() if v is not None}),
        engine=replace(base.engine, **{k: v for k, v in e.items() if v is not None}),
        linear_dtype=args.wire_dtype or base.linear_dtype,
    )


def _row(label: str, traffic: Traffic, fabric: Fabric) -> dict[str, Any]:
    busiest = max(traffic.sent + traffic.received)
    side = "trainer" if max(traffic.sent) >= max(traffic.received) else "engine"
    index = (traffic.sent if side == "trainer" else traffic.received).index(busiest)
    seconds, bound = traffic.seconds(fabric), traffic.lower_bound(fabric)
    engine_s = traffic.engine_seconds(fabric)
    slowest = max(range(len(engine_s)), key=engine_s.__getitem__)
    descriptors = [a + b for a, b in zip(traffic.descriptors, traffic.nvlink_descriptors, strict=True)]
    return {
        "label": label,
        "bytes_sent": sum(traffic.sent) + sum(traffic.nvlink_sent),
        "bytes_received": sum(traffic.received) + sum(traffic.nvlink_received),
        "needed_bytes": sum(traffic.per_pair.values()),
        "nic_bytes_sent": traffic.sent,
        "nic_bytes_received": traffic.received,
        "nvlink_bytes": sum(traffic.nvlink_sent),
        "most_loaded_nic": {"side": side, "gpu": index, "bytes": busiest},
        "descriptors_per_engine_rank": {"max": max(descriptors), "mean": sum(descriptors) / len(descriptors)},
        "descriptor_s": traffic.descriptor_seconds(fabric),
        "slowest_engine_rank": {"gpu": slowest, "seconds": engine_s[slowest], "descriptors": descriptors[slowest]},
        "staging_bytes_max": max(traffic.staging),
        "modelled_s": seconds,
        "modelled_bytes_only_s": traffic.seconds(fabric, descriptors=False),
        "lower_bound_s": bound,
        "most_loaded_over_bound": seconds / bound if bound else 0.0,
        "target_bytes": traffic.target_bytes,
        "reads": traffic.reads,
        "plan_refit_calls": traffic.planned,
        "plan_seconds": traffic.plan_seconds,
    }


def run_scenario(s: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(s.model)
    if args.from_reader:
        if not supports_reader(cfg):
            raise SystemExit(f"refit-bench plan --from-reader: {s.model} is not a multi-latent attention model")
        meta, sources, tensors = reader_sources(cfg, s.trainer, linear_dtype=s.linear_dtype)
        full_bytes = tensors_bytes(tensors)
    else:
        meta, sources = synthesize_sources(cfg, s.trainer, linear_dtype=s.linear_dtype)
        full_bytes = model_bytes(cfg, linear_dtype=s.linear_dtype)
    fabric = Fabric(
        nic_gbps=args.nic_gbps, nvlink_gbps=args.nvlink_gbps, colocated=args.colocated,
        nic_descriptor_us=args.descriptor_us,
    )  # fmt: skip
    variants = [("first replica", False)] if args.no_stripe else [("striped", True), ("first replica", False)]
    rows = []
    with tqdm(
        total=s.engine.world * len(variants),
        desc=f"planning {s.name}",
        unit="rank",
        disable=args.no_progress,
        leave=False,
    ) as bar:
        for label, stripe in variants:
            traffic = simulate(
                model=meta,
                sources=sources,
                trainer_gpus_per_node=s.trainer.gpus_per_node,
                engine=s.engine,
                fabric=fabric,
                stripe=stripe,
                exact=args.exact,
                max_overread=args.max_overread,
                progress=bar.update,
            )
            rows.append(_row(label, traffic, fabric))
    return {
        "scenario": s.name,
        "model": s.model,
        "wire_dtype": s.linear_dtype or cfg.get("torch_dtype", "bfloat16"),
        "trainer": {**asdict(s.trainer), "world": s.trainer.world, "describe": s.trainer.describe()},
        "engine": {
            **asdict(s.engine),
            "scheme": s.engine.scheme.value,
            "world": s.engine.world,
            "describe": s.engine.describe(),
        },
        "fabric": asdict(fabric),
        "trainer_sources": "reader" if args.from_reader else "synthetic",
        "trainer_descriptors": sum(len(src.tensors) for src in sources),
        "trainer_published_bytes": sum(d.nbytes for src in sources for d in src.tensors),
        "model_bytes": full_bytes,
        "trainer_mirror_bytes_max": max(mirror_bytes(sources)),
        "exact": args.exact,
        "max_overread": args.max_overread,
        "rows": rows,
        "anchor": asdict(s.anchor) if s.anchor else None,
        "assumptions": list(s.assumptions),
    }


def _stats(values: list[int]) -> str:
    return f"{min(values) / GB:8.2f} {sum(values) / len(values) / GB:8.2f} {max(values) / GB:8.2f}"


def print_table(result: dict[str, Any]) -> None:
    a = result["anchor"]
    print(f"\n== {result['scenario']}: {result['model']} ({result['wire_dtype']} GEMM weights on the wire)")
    print(f"   trainer {result['trainer']['describe']}  ->  engine {result['engine']['describe']}")
    print(f"   trainer descriptors ({result['trainer_sources']}): {result['trainer_descriptors']:,} in all, "
          f"{result['trainer_published_bytes'] / GB:.2f} GB published over all ranks")  # fmt: skip
    if result["trainer_mirror_bytes_max"]:
        print(f"   trainer memory for column blocks (a live publisher's mirror): up to "
              f"{result['trainer_mirror_bytes_max'] / GB:.2f} GB per rank")  # fmt: skip
    f = result["fabric"]
    print(
        f"   model {result['model_bytes'] / GB:.1f} GB; engine ranks hold {result['rows'][0]['target_bytes'] / GB:.1f}"
        f" GB in all; NIC {f['nic_gbps']:g} GB/s and {f['nic_descriptor_us']:g} us a descriptor,"
        f" NVLink {f['nvlink_gbps']:g} GB/s; enclosing blocks up to {result['max_overread']:g} x needed bytes"
    )
    print(
        f"   {'':14} {'sent GB/NIC min mean max':>26} {'recv GB/NIC min mean max':>26} {'busiest NIC':>18}"
        f" {'desc/rank max':>13} {'mean':>11} {'desc ms':>9} {'bytes s':>7} {'modelled s':>10} {'bound s':>8}"
        f" {'ratio':>6} {'staging GB':>10}"
    )
    for r in result["rows"]:
        m, d = r["most_loaded_nic"], r["descriptors_per_engine_rank"]
        print(
            f"   {r['label']:14} {_stats(r['nic_bytes_sent']):>26} {_stats(r['nic_bytes_received']):>26} "
            f"{m['side']:>7} {m['gpu']:4d} {m['bytes'] / GB:5.1f}G {d['max']:13,d} {d['mean']:11,.0f} "
            f"{r['descriptor_s'] * 1e3:9.1f} {r['modelled_bytes_only_s']:7.3f} {r['modelled_s']:10.3f} "
            f"{r['lower_bound_s']:8.3f} {r['most_loaded_over_bound']:6.3f} {r['staging_bytes_max'] / GB:10.2f}"
        )
    if a:
        span = f"{a['low_s']:g}" if a["low_s"] == a["high_s"] else f"{a['low_s']:g}-{a['high_s']:g}"
        print(f"   anchor: {a['who']}: {span} s ({a['setup']})")
    for note in result["assumptions"]:
        print(f"   assumption: {note}")


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib  # optional: the `bench` extra
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8))
    width, xs = 0.2, range(len(results))
    for i, (key, label) in enumerate((("striped", "modelled, striped"), ("first replica", "modelled, first replica"))):
        rows = [next((r for r in res["rows"] if r["label"] == key), None) for res in results]
        bytes_only = [r["modelled_bytes_only_s"] if r else 0.0 for r in rows]
        extra = [r["modelled_s"] - r["modelled_bytes_only_s"] if r else 0.0 for r in rows]
        at = [x + (i - 1.5) * width for x in xs]
        bar = top.bar(at, bytes_only, width, label=f"{label}: bytes")
        top.bar(at, extra, width, bottom=bytes_only, color=bar.patches[0].get_facecolor(), alpha=0.45, hatch="//",
                label=f"{label}: + descriptors")  # fmt: skip
    top.bar(
        [x + 0.5 * width for x in xs],
        [res["rows"][0]["lower_bound_s"] for res in results],
        width,
        label="lower bound (NIC bytes / aggregate NIC bandwidth)",
    )
    anchors = [res["anchor"] or {"low_s": 0.0, "high_s": 0.0} for res in results]
    top.bar(
        [x + 1.5 * width for x in xs],
        [a["high_s"] for a in anchors],
        width,
        label="published anchor",
        alpha=0.6,
        yerr=[[a["high_s"] - a["low_s"] for a in anchors], [0.0] * len(anchors)],
    )
    top.set_xticks(list(xs), [res["scenario"] for res in results])
    top.set_ylabel("refit time, s")
    top.set_yscale("log")
    top.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    top.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    top.legend(fontsize=8)
    for res in results:
        for r in res["rows"]:
            loads = sorted(r["nic_bytes_sent"], reverse=True)
            bottom.plot([v / GB for v in loads], label=f"{res['scenario']}, {r['label']}")
    bottom.set_xlabel("trainer GPU NICs, most loaded first")
    bottom.set_ylabel("GB sent per NIC")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    logger.info("wrote %s", path)


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return out.stdout.strip()


def run(args: argparse.Namespace) -> int:
    bases = [PRESETS[name] for name in args.preset] if args.preset else [None]
    results = [run_scenario(_scenario(args, base), args) for base in bases]
    for result in results:
        print_table(result)
    doc = {
        "mode": "plan",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "git": _git_sha(),
        "results": results,
    }
    if args.plot:
        plot(results, args.plot)
    if args.json == "-":
        print(json.dumps(doc))
    elif args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0
