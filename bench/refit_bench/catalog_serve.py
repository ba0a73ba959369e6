"""What the catalog benchmarks (`bench/scripts/catalog_load.py`, `catalog_resolve.py`) share: a
`refit-catalog serve` process of this checkout, latency percentiles, and the clean-up of their Redis keys.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, kw_only=True, slots=True)
class CatalogProcess:
    """A running `refit-catalog serve`: where it listens, and its process id."""

    address: str
    pid: int

    def cpu_s(self) -> float:
        """CPU seconds (user + system, every thread) the process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@contextlib.contextmanager
def serve(store: str, *, args: Sequence[str] = (), stop_s: float = 30.0) -> Iterator[CatalogProcess]:
    """A `refit-catalog serve` process serving `store` (with extra `args`), for the block."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "server"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "refit_server.cli", "serve", "--port", "0", "--store", store,
           "--log-level", "WARNING", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "refit catalog serving on HOST:PORT"; blocks until it binds
        if not line:
            raise RuntimeError(f"refit-catalog exited with {proc.wait(timeout=10)} before serving")
        yield CatalogProcess(address=line.split()[-1], pid=proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=stop_s)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p99 and max of `values` (seconds), in milliseconds."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 99
    return {
        "n": len(ordered),
        "p50_ms": round(q[49] * 1e3, 2),
        "p99_ms": round(q[98] * 1e3, 2),
        "max_ms": round(ordered[-1] * 1e3, 2),
    }


def drop_redis_keys(url: str, prefix: str) -> int:
    """Delete every key under `prefix:` in the Redis at `url`; returns how many there were."""
    import redis

    with redis.Redis.from_url(url) as raw:
        keys = list(raw.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            raw.delete(*keys)
    return len(keys)
