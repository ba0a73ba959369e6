"""What a process on a trainer rank's own host reads without NIXL: the rank's version words, mapped
from shared memory, and the host's identity that tells a receiver it is there.

A trainer rank keeps its version words (`refit.trainer.fence`) in one page of `/dev/shm`, registered
with NIXL as before for receivers on other hosts, and names the page in its records (`fence_shm`). A
receiver on the same host maps the page read-only once and reads a word as a load from memory: ~1 us
instead of an 8-byte NIXL READ, which costs 0.15-0.2 ms inside a refit on an H200's host (each refit
reads the words twice). Where the page cannot be opened (another container's `/dev/shm`), the words are
read over NIXL and the reason is logged once.

A page outlives a trainer killed before it could unlink it. Each owner holds a shared `flock` on its
page for as long as it lives (the kernel drops it with the process, in any PID namespace); the next
`SharedWords` made on the host removes every page whose lock it can take exclusively.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import socket
import stat
import struct
import uuid
from collections.abc import Collection
from pathlib import Path

import torch

from refit.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["PAGE_BYTES", "SharedWords", "WordReader", "host_id", "remove_orphans", "valid_shm_name"]

PAGE_BYTES = 4096  # the words' page: a word's offset in it is its address modulo the page size
_SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"refit-words-[0-9a-f]{32}")


def host_id() -> str:
    """This host's identity: its kernel's boot id (shared by the containers of one host), else its name."""
    try:
        return "boot:" + Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "host:" + socket.gethostname()


def valid_shm_name(name: str) -> bool:
    """Whether `name` is one `SharedWords` makes (a receiver opens nothing else under /dev/shm)."""
    return _NAME.fullmatch(name) is not None


def _open_page(path: Path) -> int:
    """A read-only fd of the page at `path`; OSError for anything but a regular file (a FIFO someone
    made under a page's name would block `open`, a link would lead elsewhere)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def remove_orphans(directory: Path = _SHM_DIR) -> int:
    """Unlink the word pages in `directory` whose owners are gone (no lock held on them); returns how many."""
    removed = 0
    for path in directory.glob("refit-words-*"):
        if not valid_shm_name(path.name):
            continue
        try:
            fd = _open_page(path)
        except OSError:
            continue  # unlinked meanwhile, not ours to read, or not a page
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Held exclusively: no owner is alive, and none can appear (a page is born locked, below).
            path.unlink()
            removed += 1
        except OSError:
            continue  # locked by a live owner, or another user's page (sticky /dev/shm)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d version-word pages of trainer processes that are gone", removed)
    return removed


class SharedWords:
    """`count` int64 words in a fresh page of /dev/shm, readable by every process of the host."""

    def __init__(self, count: int) -> None:
        if not 0 < count * 8 <= PAGE_BYTES:
            raise ConfigError(f"{count} version words do not fit one {PAGE_BYTES}-byte page")
        remove_orphans()
        token = uuid.uuid4().hex
        self.name = f"refit-words-{token}"
        # Made under a name the sweep ignores, locked, then renamed: never seen without its lock.
        draft = _SHM_DIR / f"refit-draft-{token}"
        fd = os.open(draft, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.ftruncate(fd, PAGE_BYTES)
            self._map = mmap.mmap(fd, PAGE_BYTES)
            os.rename(draft, _SHM_DIR / self.name)
        except BaseException:
            draft.unlink(missing_ok=True)
            os.close(fd)
            raise
        self._fd = fd  # open for the owner's lifetime: it holds the lock that marks the page alive
        self.words = torch.frombuffer(self._map, dtype=torch.int64, count=count)

    def close(self) -> None:
        """Unlink the page (readers that mapped it keep their mapping) and unmap it here."""
        (_SHM_DIR / self.name).unlink(missing_ok=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        del self.words  # the tensor exports the map's buffer: dropped before the map closes
        try:
            self._map.close()
        except BufferError:  # a view of the words is still alive somewhere; the map goes with it
            logger.debug("the version words' page is still referenced; left mapped", exc_info=True)


class WordReader:
    """A receiver's side: version words of trainer ranks on its host, read from their mapped pages."""

    def __init__(self) -> None:
        self.host = host_id()
        self._maps: dict[str, mmap.mmap] = {}
        self._refused: set[str] = set()
        self.reads = 0  # words read from shared memory, for stats

    def can_read(self, host: str, name: str) -> bool:
        """Whether the word a record names (`SourceRecord.host`, `fence_shm`) is read here."""
        if not name or host != self.host or name in self._refused:
            return False
        if name in self._maps:
            return True
        if not valid_shm_name(name):
            self._refused.add(name)
            return False
        try:
            fd = _open_page(_SHM_DIR / name)
            try:
                self._maps[name] = mmap.mmap(fd, PAGE_BYTES, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            self._refused.add(name)
            logger.warning("version words %s cannot be mapped (%s); reading them over NIXL", name, exc)
            return False
        return True

    def read(self, name: str, addr: int) -> int:
        """The word at trainer address `addr` of page `name` (mapped by `can_read`)."""
        self.reads += 1
        return struct.unpack_from("<q", self._maps[name], (addr % PAGE_BYTES) & ~7)[0]

    def retain(self, names: Collection[str]) -> None:
        """Unmap the pages not in `names` (those of the version being pulled): a trainer rank that left
        or restarted under a new page is not read again, and its page's memory is let go once its owner
        unlinked it. A refused name not among them may be tried again."""
        for name in [n for n in self._maps if n not in names]:
            self._maps.pop(name).close()
        self._refused &= set(names)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
