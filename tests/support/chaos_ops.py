"""Trainer-side chaos steps run on every rank of a `TrainerCluster` (see cluster.py): a rank that
dies by SIGKILL inside `stream_weights`, and a rank moved into another network namespace.

Each function has the cluster's signature `fn(state, rank, world_size, **kwargs)` and returns a
small picklable value. Publishers are the ones `refit_ops.publish` keeps in `state["publishers"]`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from typing import Any

from tests.support.refit_ops import _publishers

# The dying rank's answer must reach the test before the kill, or the cluster takes it for a crash.
_ANSWER_S = 1.0
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_SLAVE, _MNT_DETACH = 0x4000, 1 << 19, 2


def publish_and_die(state: dict, rank: int, world_size: int, *, name: str, version: int, ranks: list[int]) -> Any:
    """Publish `version`; each rank in `ranks` is SIGKILLed inside `stream_weights`, after its weights are
    staged and before its part reaches the catalog (so the version never becomes READY)."""
    pub = _publishers(state)[name]
    if rank not in ranks:
        return pub.stream_weights(version).state.value

    def die(**_: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def publish_late() -> None:
        time.sleep(_ANSWER_S)
        pub._client.publish = die  # the catalog call of this rank's part is where it dies
        pub.stream_weights(version)

    threading.Thread(target=publish_late, daemon=True).start()
    return "dying"


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def enter_netns(state: dict, rank: int, world_size: int, *, path: str, ranks: list[int]) -> bool:
    """Move the worker's main thread (and every thread and socket it creates from now on, NIXL's UCX
    worker included) into the network namespace at `path`; other ranks stay where they are.

    What `ip netns exec` does, for one thread: UCX finds its TCP interfaces in /sys/class/net, which
    lists the namespace of whoever mounted /sys; so the thread also gets a mount namespace of its own
    (a slave of the host's: nothing propagates back) with a /sys of the new network namespace.
    """
    if rank not in ranks:
        return False
    libc = ctypes.CDLL(None, use_errno=True)  # os.setns and os.unshare exist from Python 3.12 only
    fd = os.open(path, os.O_RDONLY)
    try:
        _check(libc.setns(fd, _CLONE_NEWNET), f"setns({path})")
    finally:
        os.close(fd)
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None), "mount --make-rslave /")
    _check(libc.umount2(b"/sys", _MNT_DETACH), "umount /sys")
    _check(libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None), "mount sysfs /sys")
    return True


def wait_renewed(state: dict, rank: int, world_size: int, *, name: str, within_s: float) -> int:
    """Wait until this rank's publisher has reached the catalog again (a heartbeat or a re-claim after
    a lapse); returns how many times its lease lapsed so far."""
    lease = _publishers(state)[name].lease
    start, deadline = lease.renewals, time.monotonic() + within_s
    while lease.renewals <= start:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the catalog was not reached again within {within_s:g}s")
        time.sleep(0.05)
    return lease.lapses
