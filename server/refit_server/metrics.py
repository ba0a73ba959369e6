"""`CatalogMetrics`: the catalog's Prometheus metrics and the HTTP endpoint that serves them.

Owns what is measured per RPC (requests, latency, errors by status code, distinct reader
connections) and what is read from the store at scrape time (versions by state, rank claims held).
`prometheus-client` is imported only when a catalog is started with a metrics port, so the catalog
runs without it. Every catalog has its own registry: two catalogs in one process never mix figures.

Exposed (all prefixed `refit_catalog_`):
    requests_total{rpc}                      calls answered, any outcome
    errors_total{rpc,code}                   calls answered with a status other than OK
    request_seconds{rpc}                     histogram of the time spent answering
    readers                                  distinct client connections (gRPC peers) that called
                                             Resolve, GetSources or GetState in the last
                                             `reader_window_s` seconds
    versions{state}                          versions in each state (STAGING, READY, RETIRED)
    claims                                   rank claims held
    store_up                                 1 when the last scrape could read the store, else 0
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from refit.errors import ConfigError, RefitError
from refit.types import VersionState
from refit_server.stores import Store

logger = logging.getLogger(__name__)

# The RPCs a receiver refits with: their callers are counted as readers (trainers and the CLI use the others).
READ_RPCS = frozenset({"Resolve", "GetSources", "GetState"})
# Catalog calls take well under a millisecond to tens of milliseconds (a big Publish or Resolve).
_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MAX_PEERS = 100_000  # bound on the reader table, whatever the traffic


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # the metric families of the scrape-time collector
    except ImportError as exc:
        raise ConfigError("metrics_port needs the prometheus-client package (pip install prometheus-client)") from exc
    return prometheus_client


class _Readers:
    """Distinct peers seen by read RPCs within a sliding window; bounded in memory."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def saw(self, peer: str, now: float) -> None:
        with self._lock:
            self._seen[peer] = now
            if len(self._seen) > _MAX_PEERS:
                self._prune(now)
                while len(self._seen) > _MAX_PEERS:  # all recent: drop the oldest
                    del self._seen[min(self._seen, key=self._seen.__getitem__)]

    def count(self, now: float) -> int:
        with self._lock:
            self._prune(now)
            return len(self._seen)

    def _prune(self, now: float) -> None:
        cutoff = now - self._window_s
        for peer in [p for p, t in self._seen.items() if t < cutoff]:
            del self._seen[peer]


class CatalogMetrics:
    """Prometheus metrics of one catalog; `observe` is called once per answered RPC."""

    def __init__(self, store: Store, *, reader_window_s: float = 60.0) -> None:
        if reader_window_s <= 0:
            raise ConfigError(f"reader_window_s must be positive, got {reader_window_s}")
        prom = _prometheus()
        self._prom = prom
        self._store = store
        self._readers = _Readers(reader_window_s)
        self.registry = prom.CollectorRegistry()
        self._requests = prom.Counter(
            "refit_catalog_requests", "Catalog calls answered", ["rpc"], registry=self.registry
        )
        self._errors = prom.Counter(
            "refit_catalog_errors",
            "Catalog calls answered with an error status",
            ["rpc", "code"],
            registry=self.registry,
        )
        self._latency = prom.Histogram(
            "refit_catalog_request_seconds",
            "Time to answer a catalog call",
            ["rpc"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(prom, store, lambda: self._readers.count(time.monotonic())))
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def observe(self, rpc: str, code: str, seconds: float, peer: str) -> None:
        self._requests.labels(rpc).inc()
        self._latency.labels(rpc).observe(seconds)
        if code != "OK":
            self._errors.labels(rpc, code).inc()
        if rpc in READ_RPCS:
            self._readers.saw(peer, time.monotonic())

    def serve(self, *, host: str, port: int) -> int:
        """Serve `/metrics` over HTTP on `host:port` (0: a free port); returns the bound port."""
        try:
            self._http, self._thread = self._prom.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot bind the metrics endpoint to {host}:{port}: {exc.strerror}") from exc
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None


class _StoreCollector:
    """Figures read from the store and the reader table at scrape time."""

    def __init__(self, prom: Any, store: Store, readers: Callable[[], int]) -> None:
        self._core = prom.core
        self._store = store
        self._readers = readers

    def describe(self) -> list[Any]:
        return []  # collected only at scrape time, never at registration

    def collect(self) -> Iterator[Any]:
        core = self._core
        readers = core.GaugeMetricFamily("refit_catalog_readers", "Distinct reader connections in the window")
        readers.add_metric([], self._readers())
        yield readers
        up = core.GaugeMetricFamily("refit_catalog_store_up", "1 if the last scrape could read the store")
        try:
            counts = self._store.counts()
        except RefitError as exc:
            logger.warning("metrics: cannot read the catalog store: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        versions = core.GaugeMetricFamily("refit_catalog_versions", "Versions by state", labels=["state"])
        for state in VersionState:
            versions.add_metric([state.value], counts.versions.get(state, 0))
        yield versions
        claims = core.GaugeMetricFamily("refit_catalog_claims", "Rank claims held")
        claims.add_metric([], counts.claims)
        yield claims
