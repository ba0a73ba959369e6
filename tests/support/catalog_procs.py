"""A catalog server (`refit-catalog serve`) and a private Redis as separate processes, for the durability
tests: start, SIGKILL or SIGTERM, and restart on the same port, so clients keep their address.

`CatalogProcess` binds port 0 on its first start and reads the port from its first stdout line (as
`tests/integration/test_catalog_cli.py` does); a restart binds that same port again. `RedisProcess`
runs `redis-server` with an append-only file (`appendonly yes`, `appendfsync always`) in a directory of
its own; Redis cannot report a port it picked, so it gets one from `ports.free_port` and retries with
another if that one was taken meanwhile.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.support import ports

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "server"), os.environ.get("PYTHONPATH", "")]),
}
CLI = [sys.executable, "-m", "refit_server.cli"]
START_S = 60.0  # deadline of a start on a busy machine; a start that is on time returns as soon as it is up


def first_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        return ""


def _end(proc: subprocess.Popen | None, sig: int, timeout_s: float = 15.0) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class CatalogProcess:
    """`refit-catalog serve --store STORE` in a subprocess; its stderr goes to `log`."""

    def __init__(self, store: str, log: Path, *args: str) -> None:
        self.store, self.log, self.args = store, log, args
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        assert self.port, "not started"
        return f"127.0.0.1:{self.port}"

    def start(self) -> CatalogProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--port", str(self.port), "--store", self.store, "--log-level", "INFO", *self.args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=ENV,
            )
        line = first_line(self.proc, START_S)
        bound = re.fullmatch(r"refit catalog serving on 127\.0\.0\.1:(\d+)\n", line)
        if bound is None or (self.port and int(bound.group(1)) != self.port):
            _end(self.proc, signal.SIGKILL)
            raise RuntimeError(f"serve did not start: {line!r}\n{self.log.read_text()[-3000:]}")
        self.port = int(bound.group(1))
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, as when a host or container dies."""
        _end(self.proc, signal.SIGKILL)

    def stop(self) -> int | None:
        return _end(self.proc, signal.SIGTERM)

    def __enter__(self) -> CatalogProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisProcess:
    """A private `redis-server` with an append-only file fsynced on every write, in `directory`."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.dir, self.args = directory, args
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def url(self, *, db: int = 0, prefix: str = "refit") -> str:
        return f"redis://127.0.0.1:{self.port}/{db}?prefix={prefix}&timeout_s=2"

    def _launch(self, port: int) -> bool:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no",
             "--logfile", str(self.dir / "redis.log"), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)
        deadline = time.monotonic() + START_S
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False  # exited: most likely the port was taken
                try:
                    # LOADING while it replays the append-only file; PING answers only once it is done.
                    if client.ping():
                        return True
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    time.sleep(0.05)
        finally:
            client.close()
        _end(self.proc, signal.SIGKILL)
        raise RuntimeError(f"redis-server did not answer within {START_S}s")

    def start(self) -> RedisProcess:
        if self.port:  # a restart: the same port, so the catalog's store URL stays valid
            if not self._launch(self.port):
                raise RuntimeError(f"redis-server could not restart on port {self.port}: {self.log_tail()}")
            return self
        for _ in range(5):
            port = ports.free_port()
            if self._launch(port):
                self.port = port
                return self
        raise RuntimeError(f"redis-server did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        log = self.dir / "redis.log"
        return log.read_text()[-2000:] if log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM: Redis fsyncs and exits cleanly; SIGKILL: it dies at once, the append-only file as it is."""
        return _end(self.proc, sig)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGKILL)
