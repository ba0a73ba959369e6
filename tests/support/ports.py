"""Ports for tests without bind-then-close races.

A server under test binds port 0 itself and the test reads back the port it got: `CatalogServer.address`,
the first line of `refit-catalog serve --port 0`, or, for a process that does not report it (`vllm serve
--port 0`), its listening socket found with `listening_ports`. Nothing picks a port for someone else.

An address where nothing listens comes from `closed_port`. The port stays bound by a socket that never
listens for as long as the block runs:
- Linux answers a connection to a bound, non-listening TCP port with a reset, so clients get
  "connection refused" at once, as from a closed port;
- that socket sets neither SO_REUSEADDR nor SO_REUSEPORT, so no other socket can bind the port meanwhile,
  even one that sets them (gRPC, uvicorn and vLLM do), and the kernel does not hand it out for outgoing
  connections.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

_TCP_LISTEN = "0A"  # the `st` column of /proc/net/tcp


@contextlib.contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP port on `host` that refuses connections and that nothing else can bind until the block ends."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((host, 0))
        yield holder.getsockname()[1]


def listening_ports(pid: int, host: str = "127.0.0.1") -> list[int]:
    """TCP ports that process `pid` listens on at `host` (IPv4), from /proc: its socket inodes in LISTEN state.

    Linux only. An empty list while the process has not started listening yet (or has exited).
    """
    inodes: set[str] = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # an fd closed since listdir
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    if not inodes:
        return []
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except (FileNotFoundError, ProcessLookupError):
        return []
    (word,) = struct.unpack("=I", socket.inet_aton(host))
    want = f"{word:08X}"  # /proc prints the address as the raw 32-bit word in native byte order
    ports = []
    for line in table:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        address, port = local.split(":")
        if state == _TCP_LISTEN and inode in inodes and address in (want, "00000000"):
            ports.append(int(port, 16))
    return sorted(ports)


_HELD: list[socket.socket] = []  # closed at interpreter exit


def held_closed_port(host: str = "127.0.0.1") -> int:
    """Like `closed_port`, but held until the test process exits: for a dead address that a test builds once
    and uses throughout. Prefer `closed_port` where a `with` block fits."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind((host, 0))
    _HELD.append(holder)
    return holder.getsockname()[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for a server that cannot bind port 0 and report it (redis-server:
    port 0 turns its TCP listener off). Another process may take it before the server binds it, so the caller
    must retry with a fresh port when the server fails to bind (`tests/support/catalog_procs.RedisProcess`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
