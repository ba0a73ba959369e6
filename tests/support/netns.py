"""A network namespace joined to this one by a veth pair, whose link can be cut: a real partition.

`ip netns` and veth need root (CAP_NET_ADMIN). Taking the namespace end of the pair down drops
every packet silently: established TCP connections stall (no reset) until it comes back up, and
new connections fail. That is what a partition looks like to UCX over TCP.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "no `ip` command"
    if os.geteuid() != 0:
        return "not root"
    return None


@dataclass(frozen=True, kw_only=True)
class Netns:
    name: str
    path: str  # for setns(2)
    host_addr: str  # this namespace's end of the pair
    ns_addr: str  # the other namespace's end
    ns_link: str

    def partition(self) -> None:
        _ip("-n", self.name, "link", "set", self.ns_link, "down")

    def heal(self) -> None:
        _ip("-n", self.name, "link", "set", self.ns_link, "up")


@contextlib.contextmanager
def netns() -> Iterator[Netns]:
    """A fresh namespace `refit-<pid>-<n>` with a /24 of 10.0.0.0/8 shared over a veth pair; removed after."""
    tag = f"{os.getpid() % 100000}{random.randrange(100)}"
    name, host_link, ns_link = f"refit-{tag}", f"rfh{tag}", f"rfn{tag}"
    net = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host_link, "type", "veth", "peer", "name", ns_link)
        _ip("link", "set", ns_link, "netns", name)
        _ip("addr", "add", f"{net}.1/24", "dev", host_link)
        _ip("link", "set", host_link, "up")
        _ip("-n", name, "addr", "add", f"{net}.2/24", "dev", ns_link)
        _ip("-n", name, "link", "set", ns_link, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        # A route back to every host address, as a real network has. Without it a process whose UCX was
        # initialised before this pair existed (UCX caches the routing table once per process) finds
        # no route over the new link, connects from another interface with that interface's address
        # bound as the source (UCX_TCP_EP_BIND_SRC_ADDR), and the namespace cannot answer the SYN.
        _ip("-n", name, "route", "add", "default", "via", f"{net}.1")
        yield Netns(name=name, path=f"/var/run/netns/{name}", host_addr=f"{net}.1", ns_addr=f"{net}.2", ns_link=ns_link)
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("link", "del", host_link)
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("netns", "del", name)
