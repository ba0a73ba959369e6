"""`CatalogServer`: a gRPC server hosting the catalog service over a chosen store.

Owns the server's lifetime (bind, start, stop, wait) and its transport options. It can run embedded
in a test or trainer process (`with CatalogServer().start() as s: ... s.address`) or standalone via
`refit-catalog serve`.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from concurrent import futures
from urllib.parse import urlsplit, urlunsplit

import grpc

from refit.catalog.bounds import DEFAULT_LIMITS, CatalogLimits
from refit.errors import ConfigError
from refit_server.auth import Authority
from refit_server.metrics import CatalogMetrics
from refit_server.replies import DEFAULT_MAX_BYTES, ReplyCache
from refit_server.service import CatalogService, add_to_server
from refit_server.stores import DEFAULT_KEEP_RETIRED, Store, check_url, open_store
from refit_server.stores.base import check_keep_retired

logger = logging.getLogger(__name__)


def grpc_options(limits: CatalogLimits) -> tuple[tuple[str, int], ...]:
    return (
        # Set explicitly, never gRPC's default: a larger message is refused (RESOURCE_EXHAUSTED) before
        # it is read whole.
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        # gRPC sets SO_REUSEPORT by default: a second catalog on a busy port would "start" and silently
        # split the traffic (two memory stores, two truths). Refuse the port instead.
        ("grpc.so_reuseport", 0),
        # gRPC core cancels (CANCELLED) a call the server has not picked up within 30 s by default: under
        # a burst of readers the queue outlasts that, and calls were lost. The caller's deadline decides.
        ("grpc.server_max_unrequested_time_in_server", 3600),
    )


GRPC_OPTIONS = grpc_options(DEFAULT_LIMITS)


class CatalogServer:
    """The refit catalog as a gRPC server.

    Args:
        store: "memory" (in-process, the default) or "redis://host:port/db[?prefix=P]".
        port: TCP port; 0 picks a free one (read it back from `.address`).
        host: interface to bind.
        max_workers: threads serving RPCs.
        trainer_token: the credential that may claim, publish, retire and release (and read).
        reader_token: a read-only credential (get, list, latest, resolve, state, sources); needs
            `trainer_token`. With no token at all the catalog is open to anyone who reaches its
            port: for local use only (a warning is logged when bound to a non-loopback host).
        tls_cert, tls_key: PEM files of the server's certificate chain and key: serve over TLS.
        tls_ca: PEM file of the CA client certificates must chain to: mutual TLS (needs tls_cert).
        limits: bounds on every request (`refit.catalog.bounds.CatalogLimits`; the defaults fit the
            largest models refit targets); a request over them is INVALID_ARGUMENT naming the field.
        metrics_port: serve Prometheus metrics (`refit_server.metrics`) over HTTP on this port of
            `host` (0: a free one, read back from `.metrics_address`); None: no metrics endpoint.
            Needs the prometheus-client package.
        keep_retired: retention: how many RETIRED versions of each model to keep; older retired
            ones are deleted with their source records when a version is retired, so the catalog
            stays bounded however many versions a run publishes. None keeps every version; 0
            deletes each version as it is retired. Servers sharing one Redis should agree on it.
        resolve_cache_bytes: memory for encoded `Resolve` replies, each served again while its model
            is unchanged (`refit_server.replies`; `.replies.stats()` counts hits); 0: no cache.

    Raises:
        ConfigError: unknown store URL or bad arguments (at construction, before anything is bound),
            or the address cannot be bound (at `start`).
        CatalogUnavailableError: the store (Redis) cannot be reached (at `start`).
    """

    def __init__(
        self,
        *,
        store: str = "memory",
        port: int = 0,
        host: str = "127.0.0.1",
        max_workers: int = 8,
        trainer_token: str | None = None,
        reader_token: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        limits: CatalogLimits = DEFAULT_LIMITS,
        metrics_port: int | None = None,
        keep_retired: int | None = DEFAULT_KEEP_RETIRED,
        resolve_cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        check_url(store)
        if not isinstance(resolve_cache_bytes, int) or resolve_cache_bytes < 0:
            raise ConfigError(f"resolve_cache_bytes must be an int >= 0, got {resolve_cache_bytes!r}")
        self.keep_retired = check_keep_retired(keep_retired)
        if not 0 <= port < 65536:
            raise ConfigError(f"port must be in [0, 65536), got {port}")
        if metrics_port is not None and not 0 <= metrics_port < 65536:
            raise ConfigError(f"metrics_port must be in [0, 65536) or None, got {metrics_port}")
        if not isinstance(limits, CatalogLimits):
            raise ConfigError(f"limits must be a CatalogLimits, got {type(limits).__name__}")
        if max_workers <= 0:
            raise ConfigError(f"max_workers must be positive, got {max_workers}")
        if not host:
            raise ConfigError("host must be non-empty")
        if (tls_cert is None) != (tls_key is None) or (tls_ca is not None and tls_cert is None):
            raise ConfigError("tls_cert and tls_key go together; tls_ca (mutual TLS) needs them")
        self._authority = Authority(trainer_token=trainer_token, reader_token=reader_token)
        # Read now: a missing file is a ConfigError at construction, not a failed start.
        self._tls = (
            (_read(tls_key, "tls_key"), _read(tls_cert, "tls_cert"), _read(tls_ca, "tls_ca") if tls_ca else None)
            if tls_cert is not None and tls_key is not None
            else None
        )
        self.store_url = store
        self.host = host
        self.port = port
        self.max_workers = max_workers
        self.limits = limits
        self.metrics_port = metrics_port
        self.resolve_cache_bytes = resolve_cache_bytes
        self.replies: ReplyCache | None = None  # the running server's Resolve reply cache
        self._metrics: CatalogMetrics | None = None
        self._metrics_bound = 0
        self._store: Store | None = None
        self._server: grpc.Server | None = None
        self._bound_port = 0
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """ "host:port" with the port actually bound (after `start`)."""
        if not self._bound_port:
            raise ConfigError("the catalog server is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literals need brackets
        return f"{host}:{self._bound_port}"

    @property
    def metrics_address(self) -> str:
        """ "host:port" of the metrics endpoint (after `start` with a `metrics_port`)."""
        if not self._metrics_bound:
            raise ConfigError("the catalog server has no metrics endpoint (metrics_port) or is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self._metrics_bound}"

    def start(self) -> CatalogServer:
        with self._lock:
            if self._server is not None:
                return self
            store = open_store(self.store_url, keep_retired=self.keep_retired)
            metrics: CatalogMetrics | None = None
            try:
                store.ping()  # CatalogUnavailableError here, before a port is taken
                for warning in store.durability_warnings():
                    logger.warning("refit catalog store: %s", warning)
                if self.metrics_port is not None:
                    metrics = CatalogMetrics(store)
                server = grpc.server(
                    futures.ThreadPoolExecutor(max_workers=self.max_workers), options=grpc_options(self.limits)
                )
                replies = ReplyCache(max_bytes=self.resolve_cache_bytes) if self.resolve_cache_bytes else None
                add_to_server(CatalogService(store, self._authority, self.limits, metrics, replies), server)
                target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
                try:
                    if self._tls is None:
                        bound = server.add_insecure_port(target)
                    else:
                        key, cert, ca = self._tls
                        credentials = grpc.ssl_server_credentials(
                            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
                        )
                        bound = server.add_secure_port(target, credentials)
                except RuntimeError as exc:  # grpcio raises on bind failure in recent versions
                    raise ConfigError(f"cannot bind the catalog to {target}: {exc}") from exc
                if not bound:
                    raise ConfigError(f"cannot bind the catalog to {target}")
                if metrics is not None and self.metrics_port is not None:
                    self._metrics_bound = metrics.serve(host=self.host, port=self.metrics_port)
                server.start()
            except BaseException:
                if metrics is not None:
                    metrics.close()
                store.close()
                raise
            self._store, self._server, self._bound_port, self._metrics = store, server, bound, metrics
            self.replies = replies
        tls = "off" if self._tls is None else "mutual" if self._tls[2] else "on"
        auth = self._authority.mode
        logger.info("refit catalog serving on %s (store %s, auth %s, tls %s)", self.address, store, auth, tls)
        if self._metrics_bound:
            logger.info("refit catalog metrics on http://%s/metrics", self.metrics_address)
        if not _is_loopback(self.host):
            if not self._authority.enabled:
                logger.warning(
                    "refit catalog on %s has no tokens: anyone who reaches it can claim, publish and retire "
                    "(set trainer_token/reader_token; an open catalog is for local use only)",
                    self.address,
                )
            elif self._tls is None:
                logger.warning("refit catalog on %s checks tokens over plaintext: set tls_cert/tls_key", self.address)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; in-flight RPCs get `grace` seconds (None: cancelled at once). Idempotent."""
        with self._lock:
            server, store, metrics = self._server, self._store, self._metrics
            self._server = self._store = self._metrics = None
        if server is None:
            return
        server.stop(grace).wait()
        if metrics is not None:
            metrics.close()
        if store is not None:
            store.close()
        logger.info("refit catalog on port %d stopped", self._bound_port)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or `timeout` passes); True if it stopped."""
        server = self._server
        if server is None:
            return True
        return not server.wait_for_termination(timeout)  # grpc returns True on *timeout*

    def __enter__(self) -> CatalogServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.address if self._bound_port else f"{self.host}:{self.port} (not started)"
        tls = "" if self._tls is None else ", tls"
        return f"CatalogServer({where}, store={_redacted(self.store_url)!r}, auth={self._authority.mode}{tls})"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path!r}: {exc.strerror}") from exc


def _redacted(url: str) -> str:
    """The store URL without its password, for logs and reprs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
