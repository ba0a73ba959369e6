"""`CatalogServer`: a gRPC server hosting the catalog service over a chosen store.

Owns the server's lifetime (bind, start, stop, wait) and its transport options. It can run embedded
in a test or trainer process (`with CatalogServer().start() as s: ... s.address`) or standalone via
`refit-catalog serve`.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from urllib.parse import urlsplit, urlunsplit

import grpc

from refit.catalog import wire
from refit.errors import ConfigError
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit_server.service import CatalogService
from refit_server.stores import Store, check_url, open_store

logger = logging.getLogger(__name__)

GRPC_OPTIONS = (
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    # gRPC sets SO_REUSEPORT by default: a second catalog on a busy port would "start" and silently
    # split the traffic (two memory stores, two truths). Refuse the port instead.
    ("grpc.so_reuseport", 0),
)


class CatalogServer:
    """The refit catalog as a gRPC server.

    Args:
        store: "memory" (in-process, the default) or "redis://host:port/db[?prefix=P]".
        port: TCP port; 0 picks a free one (read it back from `.address`).
        host: interface to bind.
        max_workers: threads serving RPCs.

    Raises:
        ConfigError: unknown store URL or bad arguments (at construction, before anything is bound),
            or the address cannot be bound (at `start`).
        CatalogUnavailableError: the store (Redis) cannot be reached (at `start`).
    """

    def __init__(self, *, store: str = "memory", port: int = 0, host: str = "127.0.0.1", max_workers: int = 8) -> None:
        check_url(store)
        if not 0 <= port < 65536:
            raise ConfigError(f"port must be in [0, 65536), got {port}")
        if max_workers <= 0:
            raise ConfigError(f"max_workers must be positive, got {max_workers}")
        if not host:
            raise ConfigError("host must be non-empty")
        self.store_url = store
        self.host = host
        self.port = port
        self.max_workers = max_workers
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

    def start(self) -> CatalogServer:
        with self._lock:
            if self._server is not None:
                return self
            store = open_store(self.store_url)
            try:
                store.ping()  # CatalogUnavailableError here, before a port is taken
                server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers), options=GRPC_OPTIONS)
                pb_grpc.add_CatalogServicer_to_server(CatalogService(store), server)
                target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
                try:
                    bound = server.add_insecure_port(target)
                except RuntimeError as exc:  # grpcio raises on bind failure in recent versions
                    raise ConfigError(f"cannot bind the catalog to {target}: {exc}") from exc
                if not bound:
                    raise ConfigError(f"cannot bind the catalog to {target}")
                server.start()
            except BaseException:
                store.close()
                raise
            self._store, self._server, self._bound_port = store, server, bound
        logger.info("refit catalog serving on %s (store %s)", self.address, store)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; in-flight RPCs get `grace` seconds (None: cancelled at once). Idempotent."""
        with self._lock:
            server, store = self._server, self._store
            self._server = self._store = None
        if server is None:
            return
        server.stop(grace).wait()
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
        return f"CatalogServer({where}, store={_redacted(self.store_url)!r})"


def _redacted(url: str) -> str:
    """The store URL without its password, for logs and reprs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
