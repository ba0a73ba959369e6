"""`bench/scripts/catalog_load.py` as a test slice: trainer ranks publishing versions while many concurrent
readers (each with its own connection, in two processes) refit against a real catalog process, over the
memory store and a real Redis. Asserts only that every request was answered without an error; the
latency figures are the benchmark's (docs/benchmarks.md), never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "server"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]
    ),
}


def test_no_request_is_lost_under_load(store_url: str) -> None:
    store = store_url.split("?")[0]  # the script picks its own key prefix
    cmd = [sys.executable, str(ROOT / "bench" / "scripts" / "catalog_load.py"), "--json", "--store", store]
    cmd += ["--model", "llama-3-70b", "--tp", "8", "--pp", "1", "--ranks", "8"]
    cmd += ["--readers", "64", "--procs", "2", "--rounds", "3", "--versions", "2", "--timeout-s", "60"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert done.stdout, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["reads_expected"] == 64 * 3 * 2
    assert result["lost"] == 0 and result["errors"] == {}, result
    assert result["publishes"] == 8 * 3
    assert result["latency"]["resolve_known"]["n"] > 0  # readers went on with their cached plans
    assert done.returncode == 0, done.stderr
