"""`refit-bench refit`: a whole refit through the library, beside its ceiling and the classic design.

Trainer processes (a real Megatron-Core GPTModel each, TP x PP x DP, gloo) publish to an embedded
catalog; receiver processes (engine TP x replicas) pull and install into engine-owned tensors.
Reported per version: trainer registration and publish time, receiver planning, wire, the stall
(the whole `update_weights()` call; with `--split`, only `install()` after a `fetch()` that may run
while the engine generates) and end-to-end time (`update_weights()`, or `fetch()` plus `install()`, as
the engine process times it: the slowest receiver; the driver's round trip to its worker processes,
~0.6 ms more on two H200s' host, is reported apart as `driver_s`), bytes per receiver, GB/s and new
NIXL registrations. In the same run: the copy ceiling, a raw NIXL READ of the same bytes between
two processes, and the classic refit (gather on trainer rank 0, then broadcast to every receiver).

    refit-bench refit --shape llama-100m --tp 2 --engine-tp 1 --versions 3 [--device cuda] [--json -]
    refit-bench refit --shape moe-1b --tp 1 --ep 2 --dp 2 --engine-tp 2 --engine-ep 2
    refit-bench refit --shape llama-100m --tp 1 --engine-tp 4 --row-blocks 4

MoE shapes take trainer expert parallelism (`--ep`, `--etp`; the rest of the world is expert data
parallel) and engine expert parallelism (`--engine-ep`: vLLM's convention, EP over the engine's TP
ranks with whole experts), so each engine rank pulls only the experts it owns. `--row-blocks K`
publishes with `Publisher(row_blocks=K)`: row-parallel shards as K column blocks (a live mirror,
refreshed in each publish), so an engine at a higher TP reads each slice in one descriptor.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from tqdm import tqdm

from refit_bench import gpu_timeline, refit_refs, report
from refit_bench.procs import Worker, gather, rendezvous
from refit_bench.refit_ranks import NAME
from refit_bench.synthetic import SHAPES


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("refit", help="a whole refit through the library, with ceiling and classic baseline")
    p.add_argument("--shape", default="llama-100m", choices=sorted(SHAPES))
    p.add_argument("--tp", type=int, default=2, help="trainer tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="trainer pipeline parallel size")
    p.add_argument("--dp", type=int, default=1, help="trainer data parallel size (replicas to stripe over)")
    p.add_argument("--ep", type=int, default=1, help="trainer expert parallel size (MoE shapes)")
    p.add_argument("--etp", type=int, default=None, help="trainer expert tensor parallel size (default: TP)")
    p.add_argument("--engine-tp", type=int, default=1)
    p.add_argument("--engine-ep", type=int, default=1, help="engine expert parallel size: 1, or the engine TP")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (each engine-tp receivers)")
    p.add_argument(
        "--row-blocks",
        type=int,
        default=1,
        metavar="K",
        help="Publisher(row_blocks=K): row-parallel shards in K blocks",
    )
    p.add_argument(
        "--max-staging-bytes", type=int, default=None, metavar="N",
        help="Receiver(max_staging_bytes=N): the staging window per engine rank (default 1 GiB)",
    )  # fmt: skip
    p.add_argument(
        "--engine-scheme", choices=("hf", "megatron"), default="hf",
        help="the engine's tensors: hf (transformers and vLLM names; QKV, gate/up and vocabulary reshaped on "
        "the way in) or megatron (Megatron's in-framework inference: the trainer's own fused layouts at the "
        "engine's TP)",
    )  # fmt: skip
    p.add_argument("--no-direct", action="store_true", help="Receiver(direct=False): stage every tensor")
    p.add_argument(
        "--direct-min-bytes", type=int, default=None, metavar="N",
        help="Receiver(direct_min_bytes=N): shorter runs are staged (default: 64 KiB on CPU, 16 MiB on CUDA)",
    )  # fmt: skip
    p.add_argument(
        "--split", action="store_true",
        help="time fetch() (which may run while the engine generates) apart from install() (the pause); "
        "default: one update_weights() call, all of it a pause",
    )  # fmt: skip
    p.add_argument("--no-verify", action="store_true", help="Receiver(verify_digests=False): skip the digest check")
    p.add_argument(
        "--digest-ab", action="store_true",
        help="alternate the digest check on and off between refits (odd versions on, even off) and report "
        "what it adds as a share of the refit, both measured in this run (summary.digest_ab; the summary's "
        "end to end is then the median over both kinds)",
    )  # fmt: skip
    p.add_argument(
        "--cuda-ipc", choices=("on", "staged", "ab", "off"), default="on",
        help="CUDA: trainer ranks on the receivers' host read by copies over CUDA IPC (on: Receiver(cuda_ipc=True)), "
        "with the pieces it stages pulled into staging even from the engine's own GPU (staged: "
        "Receiver.mapped_install=False), the two alternated (ab: odd versions on, even staged; summary.mapped_ab), "
        "or over NIXL (off; not alternated: NIXL plans differently, so each switch would re-plan)",
    )  # fmt: skip
    p.add_argument("--versions", type=int, default=3, help="refits; the first includes connection set-up")
    p.add_argument(
        "--gpu-timeline", action="store_true",
        help="CUDA: trace every refit after the first in each receiver with CUPTI and report the delay to its "
        "first GPU operation, the GPU's busy time and gaps, and the host's tail after it (refit_bench.gpu_timeline; "
        "the profiler slows the host side, so end-to-end figures of such a run are not the untraced ones; with "
        "--json PATH the trace of receiver i is kept as PATH.trace<i>.json.gz, with --plot X.png its last "
        "refits are drawn as X.timeline<i>.png)",
    )  # fmt: skip
    p.add_argument(
        "--receiver-threads", type=int, default=0, metavar="N",
        help="torch.set_num_threads(N) in each receiver process (default 0: torch's own choice); trainer "
        "processes always use 1",
    )  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--receiver-gpu", type=int, default=0, help="GPU index of the receivers (trainer rank r uses r %% GPUs)"
    )
    p.add_argument("--iters", type=int, default=3, help="timed runs of each reference measurement")
    p.add_argument("--no-baseline", action="store_true", help="skip the classic gather-then-broadcast baseline")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON ('-': stdout)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a bar chart of GB/s")
    return p


def run(args: argparse.Namespace) -> int:
    result = measure_refit(args)
    if args.json:
        report.write_json(args.json, result)
    if args.json != "-":
        _print(result)
    if args.plot:
        report.plot_refit(result, args.plot)
    return 0


# -- the run ----------------------------------------------------------------------------------------


def measure_refit(args: argparse.Namespace) -> dict[str, Any]:
    from refit import CatalogServer

    shape = SHAPES[args.shape]
    world = args.tp * args.pp * args.dp
    receivers = args.engine_tp * args.replicas
    keys = ("shape", "tp", "pp", "dp", "ep", "etp", "engine_tp", "engine_ep", "replicas", "versions", "device",
            "receiver_gpu", "engine_scheme", "row_blocks", "max_staging_bytes", "no_direct", "direct_min_bytes",
            "split", "no_verify", "digest_ab", "cuda_ipc", "receiver_threads", "gpu_timeline")  # fmt: skip
    _check_layout(args, shape)
    config = {k: getattr(args, k) for k in keys}
    progress = args.json != "-"
    bar = tqdm(total=2 + args.versions + 2, desc="refit", unit="step", disable=not progress)
    rows: list[dict[str, Any]] = []
    with CatalogServer(store="memory", port=0).start() as server:
        store = rendezvous()  # held until the trainers are gone
        trainers = [
            Worker("refit_bench.refit_ranks:TrainerRank", rank=r, world=world, port=store.port, tp=args.tp, pp=args.pp,
                   ep=args.ep, etp=args.etp, shape=shape.name, device=args.device, catalog=server.address,
                   row_blocks=args.row_blocks)
            for r in range(world)
        ]  # fmt: skip
        rcvs = [
            Worker("refit_bench.refit_ranks:ReceiverRank", catalog=server.address, tp_rank=i % args.engine_tp,
                   tp_size=args.engine_tp, ep_size=args.engine_ep, replica=i // args.engine_tp, device=args.device,
                   gpu=args.receiver_gpu, scheme=args.engine_scheme, max_staging_bytes=args.max_staging_bytes,
                   direct=not args.no_direct, direct_min_bytes=args.direct_min_bytes, verify=not args.no_verify,
                   threads=args.receiver_threads, gpu_timeline=args.gpu_timeline)
            for i in range(receivers)
        ]  # fmt: skip
        try:
            reg = gather(trainers, cmd="register")
            bar.update()
            for version in range(1, args.versions + 1):
                pub = gather(trainers, cmd="publish", version=version)
                t0 = time.perf_counter()
                verify = not args.no_verify and (not args.digest_ab or version % 2 == 1)
                mapped = args.cuda_ipc == "on" or (args.cuda_ipc == "ab" and version % 2 == 1)
                got = gather(rcvs, cmd="update", version=version, split=args.split, verify=verify,
                             cuda_ipc=args.cuda_ipc != "off", mapped_install=mapped)  # fmt: skip
                wall = time.perf_counter() - t0
                rows.append({**_row(version, pub, got, wall), "verify": verify, "mapped_install": mapped})
                bar.update()
            if args.gpu_timeline:
                gpu_timeline.attach(rcvs, rows, args.json if args.json != "-" else None, args.plot)
            from refit.catalog.client import CatalogClient

            with CatalogClient(server.address) as client:
                sources = client.get_sources(name=NAME, version=args.versions)
            shard_bytes = refit_refs.one_replica_bytes(sources)
        finally:
            for w in trainers + rcvs:
                w.close()
    per_receiver = rows[-1]["bytes_per_receiver"]
    by_rank = {int(r): n for r, n in (rows[-1].get("bytes_by_rank") or {}).items()}
    refs = refit_refs.references(args, per_receiver, shard_bytes, receivers, bar, by_rank)
    bar.close()
    steady = rows[1:] or rows
    checked = [r for r in steady if r["verify"]] or steady  # the refits that ran the digest check
    summary = {
        "bytes_per_receiver": per_receiver,
        "seconds": statistics.median(r["refit_s"] for r in steady),
        "wire_seconds": statistics.median(r["wire_s"] for r in steady),
        # Digest cost as a share of the refit's end-to-end time: computing them on the trainer (in
        # stream_weights) and checking them on the receiver (before install).
        "digest_publish_share": statistics.median(r["digest_s"] / r["refit_s"] for r in steady),
        "digest_verify_share": statistics.median(r["verify_s"] / r["refit_s"] for r in checked),
        "digest_verify_cpu_share": statistics.median(r["verify_cpu_s"] / r["refit_s"] for r in checked),
        "unverified_bytes": steady[-1]["unverified_bytes"],
    }
    if args.digest_ab:
        # Same run, same processes: the check's cost is what the refits with it take beyond those without.
        on = [r["refit_s"] for r in steady if r["verify"]]
        off = [r["refit_s"] for r in steady if not r["verify"]]
        if on and off:
            summary["digest_ab"] = {"on_s": statistics.median(on), "off_s": statistics.median(off),
                                    "on_runs": on, "off_runs": off,
                                    "share": 1 - statistics.median(off) / statistics.median(on)}  # fmt: skip
    if args.cuda_ipc == "ab":
        on = [r["refit_s"] for r in steady if r["mapped_install"]]
        off = [r["refit_s"] for r in steady if not r["mapped_install"]]
        if on and off:
            summary["mapped_ab"] = {"on_s": statistics.median(on), "staged_s": statistics.median(off),
                                    "on_runs": on, "staged_runs": off}  # fmt: skip
    if args.gpu_timeline:
        summary["gpu_timeline"] = [gpu_timeline.medians([r["gpu"][i] for r in steady if r.get("gpu")])
                                   for i in range(receivers)]  # fmt: skip
    summary["gbps"] = per_receiver / summary["seconds"] / 1e9
    summary["wire_gbps"] = per_receiver / summary["wire_seconds"] / 1e9
    for ref in refs:
        ref["refit_vs"] = round(summary["gbps"] / ref["gbps"], 3)
        ref["wire_vs"] = round(summary["wire_gbps"] / ref["gbps"], 3)
    return {"mode": "refit", "machine": report.machine(args.device), "config": config,
            "trainer_registration_s": max(r["seconds"] for r in reg), "versions": rows, "summary": summary,
            "references": refs}  # fmt: skip


def _row(version: int, pub: list[dict], got: list[dict], wall: float) -> dict[str, Any]:
    t = [g["timings"] for g in got]
    return {
        "version": version,
        "publish_s": max(p["seconds"] for p in pub),
        "trainer_registrations": sum(p["registrations"] for p in pub),
        "receiver_registrations": sum(g["registrations"] for g in got),
        "bytes_per_receiver": max(g["bytes"] for g in got),
        # one receiver: what it read from each trainer rank (the link bound's input)
        "bytes_by_rank": got[0].get("bytes_by_rank") if len(got) == 1 else None,
        "wire_bytes_per_receiver": max(g["wire_bytes"] for g in got),
        "staging_bytes": max(g["staging_bytes"] for g in got),
        # Engine-side memory beyond the engine's own weights: the staging buffers held (peak so far).
        "peak_staging_bytes": max(g["peak_staging_bytes"] for g in got),
        "engine_extra_share": max(g["peak_staging_bytes"] / max(g["engine_bytes"], 1) for g in got),
        "direct_bytes": max(g["direct_bytes"] for g in got),
        "chunks": max(g["chunks"] for g in got),
        "fixed_s": max(g["fixed_s"] for g in got),
        "descriptors": max(g["descriptors"] for g in got),
        "plan_s": max(x["plan"] for x in t),
        "prepare_s": max(x["prepare"] for x in t),
        "wire_s": max(x["wire"] for x in t),
        "validate_s": max(x["validate"] for x in t),
        "install_s": max(x["install"] for x in t),
        "digest_s": max(p.get("digest_s", 0.0) for p in pub),
        "verify_s": max(g["verify_s"] for g in got),
        "verify_cpu_s": max(g["verify_cpu_s"] for g in got),
        "verified_bytes": max(g["verified_bytes"] for g in got),
        "unverified_bytes": max(g["unverified_bytes"] for g in got),
        "ipc_copies": max(g["ipc_copies"] for g in got),
        "mapped_chunks": max(g["mapped_chunks"] for g in got),  # chunks copied out of mapped trainer memory
        "checked_copies": max(g.get("checked_copies", 0) for g in got),  # direct batches copied and digested at once
        "stall_s": max(g["stall_s"] for g in got),
        # End to end as the engine sees it: the call(s) timed in each receiver's process, the slowest.
        "refit_s": max(g["total_s"] for g in got),
        "driver_s": wall,  # the same from the driver: adds its messages to and from the worker processes
    }


def _check_layout(args: argparse.Namespace, shape: Any) -> None:
    """Refuse, before any process starts, layouts Megatron or the engine cannot build."""
    world, etp = args.tp * args.pp * args.dp, args.etp or args.tp
    if (args.ep > 1 or args.etp or args.engine_ep > 1) and not shape.num_experts:
        raise SystemExit(f"--ep/--etp/--engine-ep need a MoE shape; {shape.name} is dense")
    if world % (etp * args.ep * args.pp):
        raise SystemExit(f"world {world} (TP*PP*DP) is not a multiple of ETP*EP*PP = {etp * args.ep * args.pp}")
    if shape.num_experts and shape.num_experts % args.ep:
        raise SystemExit(f"{shape.num_experts} experts do not split over EP {args.ep}")
    if args.gpu_timeline and args.device != "cuda":
        raise SystemExit("--gpu-timeline traces GPU operations: it needs --device cuda")
    if args.receiver_threads < 0:
        raise SystemExit(f"--receiver-threads must be >= 0, got {args.receiver_threads}")
    if args.row_blocks < 1:
        raise SystemExit(f"--row-blocks must be >= 1, got {args.row_blocks}")
    if args.engine_ep not in (1, args.engine_tp):
        raise SystemExit(f"--engine-ep must be 1 or the engine TP ({args.engine_tp}), got {args.engine_ep}")


def _print(result: dict[str, Any]) -> None:
    c, s = result["config"], result["summary"]
    print(report.machine_line(result["machine"]))
    moe = f" EP{c['ep']} ETP{c['etp'] or c['tp']}" if c.get("ep", 1) > 1 or c.get("etp") else ""
    engine_ep = f" EP{c['engine_ep']}" if c.get("engine_ep", 1) > 1 else ""
    registration = f"trainer registration {result['trainer_registration_s']:.3f}s"
    scheme = " (Megatron layout)" if c.get("engine_scheme") == "megatron" else ""
    print(f"model {c['shape']} bf16; trainer TP{c['tp']} PP{c['pp']} DP{c['dp']}{moe} -> engine TP{c['engine_tp']}"
          f"{engine_ep}{scheme} x {c['replicas']} replica(s); {registration}")  # fmt: skip
    head = ["v", "bytes/rcv", "wire bytes", "reads", "publish s", "fixed s", "wire s", "install(stall) s", "total s",
            "driver s", "GB/s", "staging peak", "direct", "chunks", "new regs"]  # fmt: skip
    rows, prev = [], None
    for r in result["versions"]:
        regs = r["trainer_registrations"] + r["receiver_registrations"]
        rows.append([r["version"], f"{r['bytes_per_receiver']:,}", f"{r['wire_bytes_per_receiver']:,}",
                     r["descriptors"], f"{r['publish_s']:.3f}", f"{r['fixed_s']:.4f}", f"{r['wire_s']:.3f}",
                     f"{r['stall_s']:.3f}", f"{r['refit_s']:.3f}", f"{r['driver_s']:.3f}",
                     f"{r['bytes_per_receiver'] / r['refit_s'] / 1e9:.2f}",
                     report.size(r["peak_staging_bytes"]), report.size(r["direct_bytes"]), r["chunks"],
                     "-" if prev is None else regs - prev])  # fmt: skip
        prev = regs
    print(report.table(head, rows))
    last = result["versions"][-1]
    staging = f"{report.size(last['peak_staging_bytes'])} = {last['engine_extra_share']:.2f}x the engine's weights"
    print(f"\nsteady state: {s['gbps']:.2f} GB/s end to end, {s['wire_gbps']:.2f} GB/s on the wire "
          f"({report.size(s['bytes_per_receiver'])} per receiver, staging {staging})")  # fmt: skip
    ref_rows = [
        [r["what"], f"{r['gbps']:.2f}", f"{r['refit_vs']:.2f}", f"{r['wire_vs']:.2f}"] for r in result["references"]
    ]
    print(report.table(["reference (same run)", "GB/s", "refit / ref", "wire / ref"], ref_rows))
    verify = (f"{s['digest_verify_share']:.1%} of the refit time to verify (the checks themselves: "
              f"{s['digest_verify_cpu_share']:.1%}, some beside the install)")  # fmt: skip
    verify = "off (--no-verify)" if c.get("no_verify") else verify
    print(f"digests: {s['digest_publish_share']:.1%} of the refit time to compute on the trainer, {verify}; "
          f"{s['unverified_bytes']:,} bytes per receiver not covered by a digest")  # fmt: skip
    ab = s.get("digest_ab")
    if ab:
        print(f"digest check on/off in this run: {1e3 * ab['on_s']:.1f} ms with it, {1e3 * ab['off_s']:.1f} ms "
              f"without (medians of {len(ab['on_runs'])} and {len(ab['off_runs'])} refits): {ab['share']:.1%} of "
              "the refit")  # fmt: skip
    if s.get("mapped_ab"):
        m = s["mapped_ab"]
        print(
            f"staged pieces copied out of the trainers' mapped memory / pulled into staging: {1e3 * m['on_s']:.2f} / "
            f"{1e3 * m['staged_s']:.2f} ms (medians of {len(m['on_runs'])} and {len(m['staged_runs'])} refits)"
        )
    if s.get("gpu_timeline"):
        print(gpu_timeline.describe(s["gpu_timeline"]))
