"""Fleet refit: bring a set of running vLLM servers to a catalog version through their HTTP routes.

Each server runs `vllm serve ... --weight-transfer-config '{"backend": "refit"}'` with
`VLLM_SERVER_DEV_MODE=1` (which exposes `/pause`, `/resume`, `/init_weight_transfer_engine`,
`/start_weight_update`, `/update_weights`, `/finish_weight_update`, `/collective_rpc`,
`/reset_prefix_cache` and `/weight_info`). Per server, in parallel: init, prefetch while it keeps
serving, then pause (mode keep) -> start -> update -> finish(weight_version) -> reset prefix cache ->
resume. `Fleet.sync()` brings servers that joined later (or missed a refit) to the current version;
`refit-fleet --watch` does that continuously. Only JSON crosses the wire.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from refit.catalog.channel import check_tls
from refit.compat import vllm as vllm_compat
from refit.config import DEFAULT_TIMEOUTS
from refit.errors import ConfigError, EngineError, RefitError
from refit.vllm.flow import RefitPlan, refit_steps, resolve_version, run
from refit.vllm.values import tls_options

logger = logging.getLogger(__name__)

CONTROL = vllm_compat.WEIGHT_TRANSFER_ATTR  # the worker attribute `/collective_rpc` calls (the refit backend)


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerResult:
    """One server's part of a fleet refit (`error` is None on success)."""

    url: str
    version: int | None
    bytes: int = 0
    bytes_per_rank: tuple[int, ...] = ()
    seconds: float = 0.0
    wire_s: float = 0.0
    stall_s: float = 0.0
    skipped: bool = False  # the server already served this version
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class VLLMServer:
    """The dev-mode HTTP routes of one vLLM server (JSON in, JSON out); the refit flow's `Control` of it."""

    def __init__(self, url: str, *, timeout_s: float = DEFAULT_TIMEOUTS.update_s) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"server URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def call(self, path: str, body: dict[str, Any] | None = None, *, query: dict[str, str] | None = None) -> Any:
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        method = "GET" if body is None and path in ("/weight_info", "/is_paused", "/get_world_size") else "POST"
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise EngineError(f"{self.url}{path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise EngineError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise EngineError(f"{self.url}{path}: not JSON: {raw[:200]!r}") from None

    def weight_version(self) -> str | None:
        reply = self.call("/weight_info")
        if not isinstance(reply, dict):
            raise EngineError(f"{self.url}/weight_info: no weight version (got {reply!r:.300})")
        return reply.get("weight_version")

    # -- refit.vllm.flow.Control ---------------------------------------------------------------------------

    def init(self, info: dict[str, Any]) -> None:
        self.call("/init_weight_transfer_engine", {"init_info": info})

    def rpc(self, **kwargs: Any) -> list[dict[str, Any]]:
        reply = self.call("/collective_rpc", {"method": CONTROL, "kwargs": kwargs})
        results = reply.get("results") if isinstance(reply, dict) else None
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise EngineError(f"{self.url}/collective_rpc: the refit backend did not answer (got {reply!r:.300})")
        return results

    def pause(self) -> None:
        self.call("/pause", {}, query={"mode": "keep"})

    def start(self) -> None:
        self.call("/start_weight_update", {})

    def update(self, version: int) -> None:
        self.call("/update_weights", {"update_info": {"version": version}})

    def finish(self, weight_version: str | None) -> None:
        self.call("/finish_weight_update", {} if weight_version is None else {"weight_version": weight_version})

    def reset(self) -> bool | None:
        # vLLM answers {"success": bool}; an empty body (older servers) says nothing either way.
        reply = self.call("/reset_prefix_cache", {}, query={"reset_running_requests": "true"})
        return bool(reply.get("success")) if isinstance(reply, dict) and "success" in reply else None

    def resume(self) -> None:
        self.call("/resume", {})


def refit_one_server(
    url: str,
    *,
    catalog: str,
    name: str,
    version: int,
    replica: int,
    timeout_s: float = DEFAULT_TIMEOUTS.update_s,
    poll_s: float = DEFAULT_TIMEOUTS.poll_s,
    token: str | None = None,
    max_staging_bytes: int | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> ServerResult:
    """Refit one server to `version` (already READY); errors are reported in the result, never raised.

    `max_staging_bytes`: each worker's staging window (None: the backend's default; see docs/vllm.md).
    `tls_*`: PEM files for a catalog served over TLS, sent to the server's workers (paths on its machine)."""
    server = VLLMServer(url, timeout_s=timeout_s)
    plan = RefitPlan(
        catalog=catalog,
        name=name,
        version=version,
        ready=True,
        replica=replica,
        timeout_s=timeout_s,
        poll_s=poll_s,
        token=token,
        max_staging_bytes=max_staging_bytes,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    t0 = time.perf_counter()
    try:
        r = run(refit_steps(plan), server)
    except Exception as exc:  # one server's failure is its result, never the fleet's
        if isinstance(exc, RefitError):
            logger.warning("refit of %s to v%d failed: %s: %s", url, version, type(exc).__name__, exc)
        else:  # a bug, not the server's answer: keep its trace (the result names its class)
            logger.exception("refit of %s to v%d failed", url, version)
        return ServerResult(
            url=url, version=version, seconds=time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}"
        )
    return ServerResult(
        url=url,
        version=version,
        bytes=r.bytes,
        bytes_per_rank=r.bytes_per_rank,
        seconds=r.seconds,
        wire_s=r.wire_s,
        stall_s=r.stall_s,
    )


class Fleet:
    """A set of vLLM servers kept at one catalog version.

    Args:
        catalog: the refit catalog's "host:port".
        name: the model's name in the catalog.
        servers: base URLs ("http://host:port"); more can be added later with `add`.
        timeout_s: deadline of one server's refit (the pull, and each HTTP call).
        max_parallel: servers refitted at the same time.
        token: the catalog token, for the fleet's reads and the servers' pulls (sent in their
            `init_info`); None: `$REFIT_CATALOG_TOKEN` here and in each server, else none.
        max_staging_bytes: each server worker's staging window (None: the backend's default, 1 GiB).
        tls_ca, tls_cert, tls_key: PEM files for a catalog served over TLS (as `Receiver`'s), for the
            fleet's reads and sent to the servers (so the paths must hold on their machines too).
    """

    def __init__(
        self,
        *,
        catalog: str,
        name: str = "default",
        servers: Sequence[str] = (),
        timeout_s: float = DEFAULT_TIMEOUTS.update_s,
        max_parallel: int = 8,
        token: str | None = None,
        max_staging_bytes: int | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        check_tls(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        if timeout_s <= 0 or max_parallel < 1 or (max_staging_bytes is not None and max_staging_bytes <= 0):
            raise ConfigError("timeout_s must be > 0, max_parallel >= 1 and max_staging_bytes positive")
        self.max_staging_bytes = max_staging_bytes
        self.catalog, self.name, self.timeout_s, self.max_parallel = catalog, name, timeout_s, max_parallel
        self._token = token  # private: a Fleet's attributes are printed, its token must not be
        self._tls = tls_options(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self._replicas: dict[str, int] = {}
        self._lock = threading.Lock()
        self.current: int | None = None  # the version the fleet was last refitted to
        for url in servers:
            self.add(url)

    @property
    def servers(self) -> list[str]:
        with self._lock:
            return list(self._replicas)

    def add(self, url: str) -> None:
        """Add a server (its replica index, which spreads reads over trainer replicas, stays fixed)."""
        url = VLLMServer(url).url
        with self._lock:
            self._replicas.setdefault(url, len(self._replicas))

    def remove(self, url: str) -> None:
        with self._lock:
            self._replicas.pop(url.rstrip("/"), None)

    def refit(self, version: int | None = None) -> list[ServerResult]:
        """Refit every server to `version` (default: the newest READY one); skip those already on it."""
        v = resolve_version(
            catalog=self.catalog, name=self.name, version=version, timeout_s=self.timeout_s, token=self._token,
            **self._tls,
        )  # fmt: skip
        self.current = v
        return self._bring(v)

    def sync(self) -> list[ServerResult]:
        """Bring servers that are not on the fleet's current version (new ones, failed ones) to it."""
        if self.current is None:
            return self.refit()
        return self._bring(self.current)

    def watch(
        self,
        *,
        interval_s: float,
        stop: threading.Event,
        on_result: Callable[[ServerResult], None],
        servers: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        """Until `stop` is set: follow the newest READY version and keep every server on it."""
        while not stop.is_set():
            if servers is not None:
                for url in servers():
                    self.add(url)
            try:
                results = self.refit()
            except RefitError as exc:
                logger.warning("fleet: %s", exc)
                results = []
            for r in results:
                if not r.skipped:
                    on_result(r)
            stop.wait(interval_s)

    def _bring(self, version: int) -> list[ServerResult]:
        with self._lock:
            targets = list(self._replicas.items())

        def one(item: tuple[str, int]) -> ServerResult:
            url, replica = item
            try:
                if VLLMServer(url, timeout_s=self.timeout_s).weight_version() == str(version):
                    return ServerResult(url=url, version=version, skipped=True)
            except Exception as exc:  # noqa: BLE001 - reported as this server's result
                return ServerResult(url=url, version=version, error=f"{type(exc).__name__}: {exc}")
            return refit_one_server(
                url,
                catalog=self.catalog,
                name=self.name,
                version=version,
                replica=replica,
                timeout_s=self.timeout_s,
                token=self._token,
                max_staging_bytes=self.max_staging_bytes,
                **self._tls,
            )

        if not targets:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_parallel, len(targets))) as pool:
            return list(pool.map(one, targets))


def _read_servers(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the token file {path!r}: {exc}") from exc
    if not token:
        raise ConfigError(f"the token file {path!r} is empty")
    return token


def main(argv: Sequence[str] | None = None) -> int:
    """`refit-fleet`: refit vLLM servers to a catalog version; one JSON line per server on stdout."""
    parser = argparse.ArgumentParser(prog="refit-fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", required=True, help="the refit catalog, host:port")
    parser.add_argument("--name", default="default", help="the model's name in the catalog")
    parser.add_argument("--server", action="append", default=[], help="a vLLM server's base URL (repeatable)")
    parser.add_argument("--servers-file", help="a file of server URLs, one a line (re-read every --watch tick)")
    parser.add_argument("--version", type=int, help="the version to install (default: the newest READY one)")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="keep following new versions and new servers")
    parser.add_argument(
        "--timeout-s", type=float, default=DEFAULT_TIMEOUTS.update_s, help="deadline of one server's refit"
    )
    parser.add_argument(
        "--token-file", help="file holding the catalog token, also sent to the servers (default $REFIT_CATALOG_TOKEN)"
    )
    parser.add_argument(
        "--max-staging-bytes", type=int, help="each worker's staging window (default 1 GiB; see docs/vllm.md)"
    )
    # The names of `refit-catalog`'s options; the files are also read by the servers' workers.
    parser.add_argument("--tls-ca", help="PEM CA of the catalog's certificate: connect over TLS (sent to the servers)")
    parser.add_argument("--tls-cert", help="PEM client certificate for a catalog requiring mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    def servers() -> list[str]:
        return args.server + (_read_servers(args.servers_file) if args.servers_file else [])

    def emit(r: ServerResult) -> None:
        sys.stdout.write(json.dumps(r.to_dict()) + "\n")
        sys.stdout.flush()

    if not servers() and args.watch is None:
        parser.error("no servers: give --server URL (repeatable) or --servers-file")
    try:
        token = _read_token(args.token_file) if args.token_file else None
        fleet = Fleet(catalog=args.catalog, name=args.name, servers=servers(), timeout_s=args.timeout_s, token=token,
                      max_staging_bytes=args.max_staging_bytes, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                      tls_key=args.tls_key)  # fmt: skip
        if args.watch is not None:
            stop = threading.Event()
            try:
                fleet.watch(interval_s=args.watch, stop=stop, on_result=emit, servers=servers)
            except KeyboardInterrupt:
                stop.set()
            return 0
        results = fleet.refit(args.version)
    except RefitError as exc:
        sys.stderr.write(f"refit-fleet: {type(exc).__name__}: {exc}\n")
        return 1
    for r in results:
        emit(r)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
