"""`refit-catalog doctor` as a user runs it (`python -m refit_server.cli doctor`): NIXL and its transports,
a real loopback READ, a live catalog with tokens (the token from `$REFIT_CATALOG_TOKEN`), and a real
Redis with and without an append-only file. Exit 0 unless a check fails; `--json` for machines."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from refit_server import CatalogServer
from tests.support.catalog_procs import CLI, ENV, RedisProcess

TRAINER, READER = "trainer-" + "t" * 24, "reader-" + "r" * 24

pytestmark = pytest.mark.redis


def doctor(*args: str, token: str | None = None) -> tuple[int, dict]:
    env = {k: v for k, v in ENV.items() if k != "REFIT_CATALOG_TOKEN"}
    if token is not None:
        env["REFIT_CATALOG_TOKEN"] = token
    out = subprocess.run([*CLI, "doctor", "--json", "--timeout-s", "20", *args], capture_output=True, text=True,
                         env=env, timeout=120, check=False)  # fmt: skip
    assert out.stdout, out.stderr
    report = json.loads(out.stdout)
    return out.returncode, {c["name"]: c for c in report["checks"]} | {"ok": report["ok"]}


@pytest.fixture
def live(redis_url: str) -> Iterator[str]:
    with CatalogServer(store=redis_url, port=0, trainer_token=TRAINER, reader_token=READER) as server:
        yield server.address


def test_doctor_passes_against_a_live_catalog_and_an_append_only_redis(live: str, tmp_path: Path) -> None:
    if not RedisProcess.available():
        pytest.skip("redis-server is not installed")
    with RedisProcess(tmp_path) as redis:
        rc, checks = doctor("--catalog", live, "--redis", redis.url(), token=READER)
    assert rc == 0 and checks["ok"], checks
    assert [checks[n]["status"] for n in ("nixl", "transports", "loopback", "catalog", "redis")] == ["ok"] * 5
    assert "1.5.1" in checks["nixl"]["detail"] and "DRAM_SEG" in checks["transports"]["detail"]
    assert "1048576 bytes" in checks["loopback"]["detail"] and "exact" in checks["loopback"]["detail"]
    assert "appendonly 'yes'" in checks["redis"]["detail"] and "appendfsync 'always'" in checks["redis"]["detail"]


def test_doctor_fails_on_a_refused_token_and_warns_on_a_volatile_redis(live: str, redis_url: str) -> None:
    rc, checks = doctor("--catalog", live, "--redis", redis_url.split("?")[0], token="wrong-" + "w" * 24)
    assert rc == 1 and not checks["ok"]
    assert checks["catalog"]["status"] == "fail" and "refuses a read" in checks["catalog"]["detail"]
    assert "AuthError" in checks["catalog"]["detail"] and "wrong" not in checks["catalog"]["detail"]  # never the token
    # The test Redis runs with its defaults (no append-only file) unless someone changed it.
    assert checks["redis"]["status"] in ("warn", "ok")
    if checks["redis"]["status"] == "warn":
        assert "append-only" in checks["redis"]["detail"]


def test_doctor_fails_when_nothing_answers(closed_port: int) -> None:
    rc, checks = doctor("--catalog", f"127.0.0.1:{closed_port}", "--redis", f"redis://127.0.0.1:{closed_port}/0")
    assert rc == 1
    assert checks["catalog"]["status"] == "fail" and "CatalogUnavailableError" in checks["catalog"]["detail"]
    assert checks["redis"]["status"] == "fail" and str(closed_port) in checks["redis"]["detail"]
    assert checks["loopback"]["status"] == "ok"  # the local checks do not depend on the network ones

    out = subprocess.run([*CLI, "doctor"], capture_output=True, text=True, env=ENV, timeout=120, check=False)
    assert out.returncode == 0, out.stderr  # nothing remote asked for: the local checks alone
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert [ln.split()[:2] for ln in lines[1:]] == [
        ["nixl", "OK"], ["transports", "OK"], ["loopback", "OK"], ["catalog", "SKIP"], ["redis", "SKIP"],
    ]  # fmt: skip
