"""`ReplyCache`: encoded `Resolve` replies kept per (model, version, known layout, ranks filter).

Under load the catalog's cost is converting the same records into the same protobuf bytes for every
reader (docs/benchmarks.md, "catalog under load"). A reply of a READY version is cached together with
the model's *generation* (`Store.generation`: a token that changes with every change such a reply
could show, lease lapses included, read after the reaper ran), and served only while the generation
is still the same: any such change invalidates it, whichever catalog server made it (the Redis store
keeps the generation in Redis). The generation is read before the store is, so a reply is never older
than the generation it is filed under. Replies of other versions (STAGING, FAILED, RETIRED: a pinned
read) are computed every time, so the parts a trainer publishes into a STAGING version, the bulk of
the catalog's writes, need not invalidate anything.

Concurrent misses of one key are computed once: the first caller computes, the others wait for its
bytes (bounded by their own deadline; a caller whose wait runs out, or whose leader failed, computes
the reply itself). Errors are never cached. Memory is bounded: least recently used replies are dropped
beyond `max_bytes`, and a reply larger than a quarter of it is not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_MAX_BYTES = 256 << 20
# A follower's wait for the leader's bytes when its call has no deadline (gRPC: no deadline set).
NO_DEADLINE_WAIT_S = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheStats:
    hits: int
    misses: int  # replies computed (a follower that computed after its leader failed counts too)
    shared: int  # callers that waited for another caller's computation of the same reply
    entries: int
    bytes: int


class _Flight:
    """A computation in progress; followers wait on `done`."""

    __slots__ = ("data", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes | None = None


class ReplyCache:
    """Thread-safe; see the module docstring."""

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[str, bytes]] = OrderedDict()
        self._flights: dict[tuple[Hashable, str], _Flight] = {}
        self._bytes = 0
        self._hits = self._misses = self._shared = 0

    def get(
        self, key: Hashable, generation: str, compute: Callable[[], tuple[bytes, bool]], *, wait_s: float | None
    ) -> bytes:
        """The reply for `key` at `generation`: cached, another caller's, or `compute()`d here.

        `compute` returns the reply and whether it may be kept; one that may not is still handed to the
        callers waiting for it (it was computed after they asked)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == generation:
                self._entries.move_to_end(key)
                self._hits += 1
                return entry[1]
            flight = self._flights.get((key, generation))
            leader = flight is None
            if flight is None:
                flight = self._flights[(key, generation)] = _Flight()
        if not leader:
            flight.done.wait(NO_DEADLINE_WAIT_S if wait_s is None else max(wait_s, 0.0))
            if flight.data is not None:
                with self._lock:
                    self._shared += 1
                return flight.data
            with self._lock:
                self._misses += 1
            return compute()[0]  # the leader failed (its error is not shared) or is late: as if uncached
        try:
            data, keep = compute()
            flight.data = data
            with self._lock:
                self._misses += 1
                if keep:
                    self._put(key, generation, data)
            return data
        finally:
            with self._lock:
                self._flights.pop((key, generation), None)
            flight.done.set()

    def _put(self, key: Hashable, generation: str, data: bytes) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])
        if len(data) > self.max_bytes // 4:
            return
        self._entries[key] = (generation, data)
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= len(dropped)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, shared=self._shared,
                              entries=len(self._entries), bytes=self._bytes)  # fmt: skip
