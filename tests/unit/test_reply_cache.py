"""`refit_server.replies.ReplyCache` on its own: generations, the memory bound, one computation per miss."""

from __future__ import annotations

import threading

import pytest

from refit_server.replies import ReplyCache


def test_a_reply_is_served_while_its_generation_holds() -> None:
    cache = ReplyCache(max_bytes=1 << 20)
    assert cache.get("k", "g1", lambda: (b"one", True), wait_s=1) == b"one"
    assert cache.get("k", "g1", lambda: (b"never computed", True), wait_s=1) == b"one"
    assert cache.get("k", "g2", lambda: (b"two", True), wait_s=1) == b"two"  # a new generation: computed again
    assert cache.get("k", "g2", lambda: (b"never computed", True), wait_s=1) == b"two"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (2, 2, 1, 3)


def test_a_reply_not_to_keep_is_not_kept() -> None:
    cache = ReplyCache()
    assert cache.get("k", "g", lambda: (b"staging", False), wait_s=1) == b"staging"
    assert cache.get("k", "g", lambda: (b"again", False), wait_s=1) == b"again"
    assert cache.stats().entries == 0


def test_memory_stays_bounded() -> None:
    cache = ReplyCache(max_bytes=1000)
    for i in range(20):
        cache.get(i, "g", lambda: (bytes(200), True), wait_s=1)
        assert cache.stats().bytes <= 1000
    assert cache.stats().entries == 5
    assert cache.get(19, "g", lambda: (b"x", True), wait_s=1) == bytes(200)  # the newest are kept
    assert cache.get(0, "g", lambda: (b"recomputed", True), wait_s=1) == b"recomputed"  # the oldest went first
    cache.get("big", "g", lambda: (bytes(251), True), wait_s=1)  # over a quarter of the bound: not kept
    assert cache.get("big", "g", lambda: (b"again", True), wait_s=1) == b"again"


def test_errors_are_not_cached_and_a_waiting_caller_computes_for_itself() -> None:
    cache = ReplyCache()
    started, release = threading.Event(), threading.Event()

    def failing() -> tuple[bytes, bool]:
        started.set()
        release.wait(5)
        raise KeyError("not found")

    def lead() -> None:
        with pytest.raises(KeyError):
            cache.get("k", "g", failing, wait_s=5)

    leader = threading.Thread(target=lead)
    leader.start()
    assert started.wait(5)
    got: list[bytes] = []
    follower = threading.Thread(target=lambda: got.append(cache.get("k", "g", lambda: (b"own", True), wait_s=5)))
    follower.start()
    release.set()
    leader.join(5)
    follower.join(5)
    assert got == [b"own"]
    assert cache.get("k", "g", lambda: (b"cached?", True), wait_s=1) in (b"own", b"cached?")


def test_a_late_leader_does_not_hold_a_caller_past_its_deadline() -> None:
    cache = ReplyCache()
    release = threading.Event()
    leader = threading.Thread(target=lambda: cache.get("k", "g", lambda: (release.wait(5) and b"slow", True), wait_s=5))
    leader.start()
    for _ in range(500):  # until the leader's computation is in flight (at most 5 s)
        if cache._flights:
            break
        threading.Event().wait(0.01)
    assert cache._flights
    assert cache.get("k", "g", lambda: (b"mine", True), wait_s=0.05) == b"mine"
    release.set()
    leader.join(5)
