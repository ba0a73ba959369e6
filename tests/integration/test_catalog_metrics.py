"""The catalog's Prometheus endpoint, scraped over HTTP from a real server (memory store and a real Redis)
after real traffic: requests and latency per RPC, errors by status code, distinct readers, versions by
state, claims held. Also `refit-catalog serve --metrics-port 0`, and a catalog without a metrics port
never importing prometheus-client."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from refit.catalog.client import CatalogClient
from refit.errors import ConfigError, VersionNotFoundError
from refit_server import CatalogServer
from tests.integration.test_catalog_cli import CLI, ENV
from tests.support import catalog_samples as samples
from tests.support.catalog_procs import first_line

prometheus_parser = pytest.importorskip("prometheus_client.parser")


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `http://address/metrics`: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in prometheus_parser.text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def metered(store_url: str) -> Iterator[CatalogServer]:
    with CatalogServer(store=store_url, port=0, max_workers=4, metrics_port=0).start() as server:
        yield server


def _publish(client: CatalogClient, version: int, ranks: list[int]) -> None:
    for r in ranks:
        source = samples.source(r, tp_size=2)
        client.publish(name="m", version=version, world_size=2, model=samples.MODEL, source=source)


def test_metrics_follow_real_traffic(metered: CatalogServer) -> None:
    with CatalogClient(metered.address, timeout_s=5.0) as trainer:
        trainer.claim(name="m", rank=0, agent_name="agent-0")
        trainer.claim(name="m", rank=1, agent_name="agent-1")
        _publish(trainer, 1, [0, 1])  # READY, then retired
        trainer.retire(name="m", version=1)
        _publish(trainer, 2, [0, 1])  # READY
        _publish(trainer, 3, [1])  # STAGING
        with pytest.raises(VersionNotFoundError):
            trainer.get_version(name="m", version=9)
        with pytest.raises(ConfigError):
            trainer.claim(name="m", rank=0, agent_name="")
    readers = [CatalogClient(metered.address, timeout_s=5.0, dedicated_connection=True) for _ in range(3)]
    try:
        for reader in readers:
            reader.resolve(name="m")
            reader.version_state(name="m", version=2)
    finally:
        for reader in readers:
            reader.close()

    m = scrape(metered.metrics_address)
    assert m[("refit_catalog_requests_total", (("rpc", "Publish"),))] == 5
    assert m[("refit_catalog_requests_total", (("rpc", "Claim"),))] == 3
    assert m[("refit_catalog_requests_total", (("rpc", "Resolve"),))] == 3
    assert m[("refit_catalog_request_seconds_count", (("rpc", "Publish"),))] == 5
    assert m[("refit_catalog_request_seconds_sum", (("rpc", "Publish"),))] > 0
    assert m[("refit_catalog_errors_total", (("code", "NOT_FOUND"), ("rpc", "GetVersion")))] == 1
    assert m[("refit_catalog_errors_total", (("code", "INVALID_ARGUMENT"), ("rpc", "Claim")))] == 1
    assert ("refit_catalog_errors_total", (("code", "OK"), ("rpc", "Publish"))) not in m
    assert m[("refit_catalog_readers", ())] == 3  # the trainer's GetVersion is no reader's call
    assert m[("refit_catalog_versions", (("state", "READY"),))] == 1
    assert m[("refit_catalog_versions", (("state", "STAGING"),))] == 1
    assert m[("refit_catalog_versions", (("state", "RETIRED"),))] == 1
    assert m[("refit_catalog_claims", ())] == 2
    assert m[("refit_catalog_store_up", ())] == 1


def test_serve_metrics_port_from_the_command_line(store_url: str) -> None:
    cmd = [*CLI, "serve", "--port", "0", "--metrics-port", "0", "--store", store_url, "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        address = first_line(proc, 60.0).split()[-1]
        metrics_line = first_line(proc, 10.0)
        assert metrics_line.startswith("refit catalog metrics on http://127.0.0.1:"), metrics_line
        metrics_address = metrics_line.split("http://")[1].removesuffix("/metrics\n")
        with CatalogClient(address, timeout_s=5.0) as client:
            client.ping()
            client.ping()
        assert scrape(metrics_address)[("refit_catalog_requests_total", (("rpc", "Ping"),))] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def test_a_catalog_without_metrics_never_imports_prometheus() -> None:
    code = (
        "import sys\n"
        "from refit_server import CatalogServer\n"
        "from refit.catalog.client import CatalogClient\n"
        "with CatalogServer().start() as s, CatalogClient(s.address) as c:\n"
        "    c.ping()\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, timeout=60)
