"""`refit-catalog`: run a catalog (`serve`), inspect one (`list`, `show`), preflight a host (`doctor`).

Owns argument parsing and the human/JSON rendering of versions and sources. Inspection goes through
`CatalogClient`, like any other reader. Every failure prints one line to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from refit.catalog.client import CatalogClient, format_ranks
from refit.errors import RefitError
from refit.types import ModelMeta, ParallelCoords, Region, SourceRecord, TensorDesc, VersionInfo
from refit_server.auth import read_token_file
from refit_server.replies import DEFAULT_MAX_BYTES
from refit_server.server import CatalogServer
from refit_server.stores import DEFAULT_KEEP_RETIRED

logger = logging.getLogger(__name__)

DEFAULT_CATALOG = "127.0.0.1:50051"

# --- rendering ------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def _size(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    value = num_bytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _coords(c: ParallelCoords) -> str:
    dense = f"tp{c.tp_rank}/{c.tp_size} pp{c.pp_rank}/{c.pp_size} ep{c.ep_rank}/{c.ep_size} dp{c.dp_rank}/{c.dp_size}"
    if c.ep_size == c.etp_size == c.edp_size == 1:
        return dense
    return f"{dense} etp{c.etp_rank}/{c.etp_size} edp{c.edp_rank}/{c.edp_size}"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _model_line(m: ModelMeta) -> str:
    parts = [
        m.architecture,
        f"{m.num_layers} layers",
        f"hidden {m.hidden_size}",
        f"heads {m.num_attention_heads} (query groups {m.num_query_groups}, kv_channels {m.kv_channels})",
        f"ffn {m.ffn_hidden_size}",
        f"vocab {m.vocab_size or '?'}/{m.padded_vocab_size} padded",
        m.params_dtype,
    ]
    flags = [f for f in ("tied_embeddings", "qkv_bias", "qk_layernorm") if getattr(m, f)]
    if not m.gated_linear_unit:
        flags.append("no gated_linear_unit")
    if m.num_experts:
        flags.append(f"{m.num_experts} experts (ffn {m.moe_ffn_hidden_size})")
    return ", ".join(parts + flags)


def _source_bytes(s: SourceRecord) -> int:
    return sum(t.nbytes for t in s.tensors)


def version_json(info: VersionInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "state": info.state.value,
        "world_size": info.world_size,
        "published_ranks": list(info.published_ranks),
        "missing_ranks": list(info.missing_ranks),
        "created_at": info.created_at,
        "ready_at": info.ready_at,
        "dead_ranks": list(info.dead_ranks),
        "failure": info.failure,
        "model": asdict(info.model),
    }


def tensor_json(t: TensorDesc) -> dict[str, Any]:
    return {**asdict(t), "role": t.role.value, "nbytes": t.nbytes}


def _region_cell(r: Region) -> str:
    return f"{r.index}:{r.device}:{r.device_id} {_size(r.nbytes)}" + (" ipc" if r.ipc_handle else "")


def region_json(r: Region) -> dict[str, Any]:
    # The CUDA IPC handle is a capability to map the trainer's memory: say whether there is one, never print it.
    out = asdict(r)
    out["cuda_ipc"] = bool(out.pop("ipc_handle"))
    return out


def source_json(s: SourceRecord, *, tensors: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rank": s.rank,
        "coords": asdict(s.coords),
        "agent_name": s.agent_name,
        "agent_metadata_bytes": len(s.agent_metadata),
        "regions": [region_json(r) for r in s.regions],
        "host": s.host,
        "fence_shm": s.fence_shm,
        "num_tensors": len(s.tensors),
        "nbytes": _source_bytes(s),
    }
    if tensors:
        out["tensors"] = [tensor_json(t) for t in s.tensors]
    return out


def render_list(infos: Sequence[VersionInfo]) -> str:
    if not infos:
        return "no versions"
    rows = [
        (i.name, i.version, i.state.value, f"{len(i.published_ranks)}/{i.world_size}", _when(i.created_at))
        for i in infos
    ]
    return _table(("NAME", "VERSION", "STATE", "RANKS", "CREATED"), rows)


def render_show(info: VersionInfo, sources: Sequence[SourceRecord], *, tensors: bool) -> str:
    missing = format_ranks(info.missing_ranks) or "none"
    lines = [
        f"name     {info.name}",
        f"version  {info.version}",
        f"state    {info.state.value}",
        f"ranks    {len(info.published_ranks)}/{info.world_size} published (missing: {missing})",
        f"created  {_when(info.created_at)}",
        f"ready    {_when(info.ready_at)}",
        *(
            [f"dead     {format_ranks(info.dead_ranks)} (their tensors are read from replicas)"]
            if info.dead_ranks
            else []
        ),
        *([f"failure  {info.failure}"] if info.failure else []),
        f"model    {_model_line(info.model)}",
        f"bytes    {_size(sum(_source_bytes(s) for s in sources))} in {sum(len(s.tensors) for s in sources)} tensors",
        "",
    ]
    rows = [
        (
            s.rank,
            _coords(s.coords),
            s.agent_name,
            ", ".join(_region_cell(r) for r in s.regions),
            len(s.tensors),
            _size(_source_bytes(s)),
        )
        for s in sources
    ]
    lines.append(_table(("RANK", "COORDS", "AGENT", "REGIONS", "TENSORS", "BYTES"), rows))
    if tensors:
        headers = ("NAME", "ROLE", "DTYPE", "LOCAL", "GLOBAL", "DIM", "STRIDE", "OFFSET", "REGION", "BYTE_OFFSET")
        for s in sources:
            lines += ["", f"rank {s.rank} ({s.agent_name}): {len(s.tensors)} tensors"]
            t_rows = [
                (
                    t.name,
                    t.role.value,
                    t.dtype,
                    _shape(t.local_shape),
                    _shape(t.global_shape),
                    t.partition_dim,
                    t.partition_stride,
                    t.offset,
                    t.region,
                    t.byte_offset,
                )
                for t in s.tensors
            ]
            lines.append(_table(headers, t_rows))
    return "\n".join(lines)


# --- commands -------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = CatalogServer(
        store=args.store,
        port=args.port,
        host=args.host,
        max_workers=args.max_workers,
        trainer_token=read_token_file(args.trainer_token_file, "trainer token") if args.trainer_token_file else None,
        reader_token=read_token_file(args.reader_token_file, "reader token") if args.reader_token_file else None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        metrics_port=args.metrics_port,
        keep_retired=None if args.keep_retired < 0 else args.keep_retired,
        resolve_cache_bytes=args.resolve_cache_mb << 20,
    )
    stop = threading.Event()
    # SIGTERM (from a supervisor or a test) stops as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    try:
        # The first stdout line names the bound address: with `--port 0` it is how a caller (a test, a
        # supervisor) learns the port without picking one itself, which would race other processes.
        print(f"refit catalog serving on {server.address}", flush=True)
        if args.metrics_port is not None:  # the second line, for the same reason
            print(f"refit catalog metrics on http://{server.metrics_address}/metrics", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=args.grace_s)
    return 0


def _client(args: argparse.Namespace) -> CatalogClient:
    token = read_token_file(args.token_file, "token") if args.token_file else None  # None: $REFIT_CATALOG_TOKEN
    return CatalogClient(args.catalog, timeout_s=args.timeout_s, token=token, tls_ca=args.tls_ca)


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = client.list_versions(name=args.name)
    print(json.dumps([version_json(i) for i in infos], indent=2) if args.json else render_list(infos))
    return 0


def _show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.get_version(name=args.name, version=args.version)
        sources = client.get_sources(name=args.name, version=args.version)
    if args.json:
        out = {**version_json(info), "sources": [source_json(s, tensors=args.tensors) for s in sources]}
        print(json.dumps(out, indent=2))
    else:
        print(render_show(info, sources, tensors=args.tensors))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from refit_server import doctor

    logging.basicConfig(level=logging.ERROR)  # the table is the report; library warnings would repeat it
    token = read_token_file(args.token_file, "token") if args.token_file else None  # None: $REFIT_CATALOG_TOKEN
    checks = doctor.run_checks(
        catalog=args.catalog, redis=args.redis, timeout_s=args.timeout_s, token=token, tls_ca=args.tls_ca
    )
    ok = not doctor.failed(checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [c.as_json() for c in checks]}, indent=2))
    else:
        print(_table(("CHECK", "STATUS", "DETAIL"), [(c.name, c.status.upper(), c.detail) for c in checks]))
    return 0 if ok else 1


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refit-catalog", description="Run or inspect a refit catalog.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a catalog server until SIGTERM or Ctrl-C")
    serve.add_argument(
        "--port", type=int, default=50051, help="TCP port (0: any free port; the first stdout line names it)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind")
    serve.add_argument("--store", default="memory", help="'memory' or redis://host:port/db[?prefix=P]")
    serve.add_argument("--max-workers", type=int, default=8, help="RPC worker threads")
    serve.add_argument("--grace-s", type=float, default=2.0, help="seconds in-flight RPCs get on shutdown")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.add_argument(
        "--trainer-token-file", default=None, help="file holding the token that may publish (default: open catalog)"
    )
    serve.add_argument("--reader-token-file", default=None, help="file holding a read-only token")
    serve.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS (with --tls-key)")
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    serve.add_argument("--tls-ca", default=None, help="PEM CA that client certificates must chain to (mutual TLS)")
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics over HTTP on this port of --host (0: a free one, printed on the second line)",
    )
    serve.add_argument(
        "--keep-retired",
        type=int,
        default=DEFAULT_KEEP_RETIRED,
        help=f"retired versions kept per model; older ones are deleted (default {DEFAULT_KEEP_RETIRED}; "
        "0: delete at retirement; -1: keep every version)",
    )
    serve.add_argument(
        "--resolve-cache-mb",
        type=_non_negative,
        default=DEFAULT_MAX_BYTES >> 20,
        help=f"memory for encoded Resolve replies, served again while their model is unchanged "
        f"(default {DEFAULT_MAX_BYTES >> 20}; 0: no cache)",
    )
    serve.set_defaults(func=_serve)

    def inspector(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--catalog", default=DEFAULT_CATALOG, help=f"catalog host:port (default {DEFAULT_CATALOG})")
        p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each catalog call")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--token-file", default=None, help="file holding a catalog token (default $REFIT_CATALOG_TOKEN)")
        p.add_argument("--tls-ca", default=None, help="PEM CA of the catalog's certificate: connect over TLS")
        return p

    lst = inspector("list", "list versions")
    lst.add_argument("--name", default=None, help="only this model")
    lst.set_defaults(func=_list)

    show = inspector("show", "show one version and its sources")
    show.add_argument("name")
    show.add_argument("version", type=int)
    show.add_argument("--tensors", action="store_true", help="also list every tensor of every source")
    show.set_defaults(func=_show)

    doc = sub.add_parser("doctor", help="preflight: NIXL, UCX, a loopback READ, the catalog, Redis")
    doc.add_argument("--catalog", default=None, help="catalog host:port to Ping and read (default: not checked)")
    doc.add_argument("--redis", default=None, help="redis://host:port/db store URL to check (default: not checked)")
    doc.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each check's waits")
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    doc.add_argument("--token-file", default=None, help="file holding a catalog token (default $REFIT_CATALOG_TOKEN)")
    doc.add_argument("--tls-ca", default=None, help="PEM CA of the catalog's certificate: connect over TLS")
    doc.set_defaults(func=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RefitError as exc:
        message = " ".join(str(exc).split())  # one line, even if a gRPC detail had newlines
        print(f"refit-catalog: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
