"""Helper processes for the benchmarks: spawned workers driven by JSON commands over a pipe.

A benchmark needs its transfers to cross a process boundary, as in production, so every mode runs
its sources (and sometimes its receivers) in spawned workers. Commands and replies are JSON bytes
(never pickles); a worker's exception comes back as an error reply and is raised in the parent.

Process groups meet at a TCPStore the parent hosts on a port the OS picks (`rendezvous`) and keeps
open for the group's life: no port is probed, closed and bound again later by someone else.
"""

from __future__ import annotations

import datetime
import json
import logging
import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

Handler = Callable[[dict[str, Any]], dict[str, Any]]
HOST = "127.0.0.1"
GROUP_TIMEOUT_S = 600.0  # rendezvous and collectives; a big model's first publish can take minutes


def rendezvous(timeout_s: float = GROUP_TIMEOUT_S) -> dist.TCPStore:
    """A TCPStore server on a port the OS picks; pass its `.port` to `join_group` and keep it open."""
    return dist.TCPStore(
        HOST, 0, world_size=None, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


def join_group(
    backend: str,
    *,
    rank: int,
    world_size: int,
    port: int = 0,
    store: dist.TCPStore | None = None,
    timeout_s: float = GROUP_TIMEOUT_S,
) -> None:
    """Join the default process group through the `rendezvous` store (its port, or the store itself)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(HOST, port, world_size=None, is_master=False, timeout=timeout)
    # Some libraries read these even when the group came from a store: point them at the same server.
    os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(store.port))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _serve(conn: Any, factory: str, kwargs: dict[str, Any], env: dict[str, str]) -> None:
    os.environ.update(env)
    # Spawned workers start without the parent's logging set-up; REFIT_LOG_LEVEL applies to them too.
    logging.basicConfig(
        level=os.environ.get("REFIT_LOG_LEVEL", "WARNING"),
        format="%(relativeCreated).3f %(levelname)s %(name)s[%(process)d %(threadName)s]: %(message)s",
    )
    module, _, attr = factory.partition(":")
    try:
        import importlib

        handler: Handler = getattr(importlib.import_module(module), attr)(**kwargs)
        conn.send_bytes(json.dumps({"ok": True}).encode())
    except BaseException:  # noqa: BLE001 - report start-up failures to the parent
        conn.send_bytes(json.dumps({"ok": False, "error": traceback.format_exc()}).encode())
        return
    while True:
        msg = json.loads(conn.recv_bytes())
        if msg.get("cmd") == "quit":
            conn.send_bytes(b'{"ok": true}')
            return
        try:
            reply = {"ok": True, **handler(msg)}
        except BaseException:  # noqa: BLE001 - the parent raises it with the worker's traceback
            reply = {"ok": False, "error": traceback.format_exc()}
        conn.send_bytes(json.dumps(reply).encode())


class WorkerError(RuntimeError):
    pass


class Worker:
    """One spawned process running `factory(**kwargs)`, a callable that answers command dicts."""

    def __init__(self, factory: str, *, timeout_s: float = 600.0, env: dict[str, str] | None = None, **kwargs: Any):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._timeout_s = timeout_s
        self.process = ctx.Process(target=_serve, args=(child, factory, kwargs, env or {}), daemon=True)
        self.process.start()
        self._started = False

    def _reply(self, timeout_s: float | None) -> dict[str, Any]:
        if not self._conn.poll(timeout_s or self._timeout_s):
            raise WorkerError(f"worker {self.process.pid} did not answer within {timeout_s or self._timeout_s:.0f}s")
        reply = json.loads(self._conn.recv_bytes())
        if not reply.pop("ok"):
            raise WorkerError(f"worker {self.process.pid} failed:\n{reply['error']}")
        return reply

    def wait_started(self, timeout_s: float | None = None) -> None:
        if not self._started:
            self._reply(timeout_s)
            self._started = True

    def send(self, **msg: Any) -> None:
        """Send a command without waiting (several workers can then run it at once)."""
        self.wait_started()
        self._conn.send_bytes(json.dumps(msg).encode())

    def recv(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self._reply(timeout_s)

    def call(self, timeout_s: float | None = None, **msg: Any) -> dict[str, Any]:
        self.send(**msg)
        return self.recv(timeout_s)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                if self._started:
                    self._conn.send_bytes(b'{"cmd": "quit"}')
                    self._conn.poll(10)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout=5)
        self._conn.close()


def gather(workers: list[Worker], timeout_s: float | None = None, **msg: Any) -> list[dict[str, Any]]:
    """Send one command to every worker, then collect every reply (they run concurrently)."""
    for w in workers:
        w.send(**msg)
    return [w.recv(timeout_s) for w in workers]
