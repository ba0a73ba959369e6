"""A trainer rank's version words: what a receiver reads after its pull to know the bytes it read
were not changed meanwhile, without a round trip to the catalog.

One little-endian int64 per place the rank publishes from (the live parameters, or each snapshot
slot), in host memory registered with the rank's NIXL agent: a page of /dev/shm where it can make one
(`refit.transport.host.SharedWords`: receivers on this host map it instead of reading over NIXL), else
a plain tensor. A word holds the version whose bytes its place holds, and `RETIRED` from before the
first byte of that place changes until the place holds a new version again. Its address travels in
each SourceRecord (`fence_addr`, and the page's name in `fence_shm`).

Why it is a fence: the rank writes the word before it retires the version in the catalog and before
any byte changes (the optimizer step, or the copy into a reused snapshot slot, is issued after the
store), and publishes the new value only once the new bytes have landed. A receiver reads the word
after every byte of its pull has landed: if it still holds the version it pulled, no byte was
changed before its reads ended. This is the catalog's READY re-check (the seqlock of docs/hooks.md)
with the sequence number kept where the bytes are.
"""

from __future__ import annotations

import logging

import torch

from refit.transport.host import PAGE_BYTES, SharedWords
from refit.transport.nixl import NixlAgent
from refit.types import WORD_RETIRED as RETIRED

logger = logging.getLogger(__name__)

WORD_BYTES = 8


class VersionWords:
    """`count` version words of one trainer rank, registered with `agent` (closed by the caller)."""

    def __init__(self, agent: NixlAgent, count: int) -> None:
        self._agent = agent
        self._shared: SharedWords | None = None
        if count * WORD_BYTES <= PAGE_BYTES:
            try:
                self._shared = SharedWords(count)
            except OSError as exc:  # no /dev/shm: receivers on this host read the words over NIXL too
                logger.info("version words in process memory (no shared page: %s)", exc)
        self._words = self._shared.words if self._shared is not None else torch.empty(count, dtype=torch.int64)
        self._words.fill_(RETIRED)
        self._agent.register(self.addr(0), count * WORD_BYTES)
        self._registered = True

    @property
    def shm_name(self) -> str:
        """The shared page holding the words ("" : none), for the records' `fence_shm`."""
        return self._shared.name if self._shared is not None else ""

    def addr(self, place: int) -> int:
        """The address of place `place`'s word: the record's `fence_addr`."""
        return self._words.data_ptr() + place * WORD_BYTES

    def publish(self, place: int, version: int) -> None:
        """Place `place` holds `version` now (its bytes have landed)."""
        self._words[place] = version

    def retire(self, place: int) -> None:
        """Place `place`'s bytes are about to change: readers of its version discard what they pulled."""
        self._words[place] = RETIRED

    def retire_all(self) -> None:
        self._words.fill_(RETIRED)

    def close(self) -> None:
        """Retire every word and deregister them (the agent stays the caller's)."""
        self.retire_all()
        if self._registered:
            self._registered = False
            try:
                self._agent.deregister(self.addr(0), self._words.numel() * WORD_BYTES)
            except Exception:  # the agent frees its registrations when it closes either way
                logger.warning("deregistering the version words failed", exc_info=True)
        if self._shared is not None:
            self._words = self._words.clone()  # retired; the page goes
            self._shared.close()
            self._shared = None
