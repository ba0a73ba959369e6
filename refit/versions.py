"""A receiver's view of one model's versions in the catalog: which version to pull and from whom,
and the re-check after a pull (the seqlock that keeps bytes a trainer overwrote mid-pull out of an
engine): the trainers' version words, read over NIXL (or from their shared page, for a trainer on the
receiver's host) where every source has one, else the catalog.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from refit.catalog.client import CatalogClient
from refit.catalog.values import Resolved
from refit.config import DEFAULT_TIMEOUTS, MIN_WAIT_S
from refit.errors import DigestError, RefitError, VersionNotFoundError, VersionRetiredError
from refit.types import SourceRecord, VersionState, have_words

logger = logging.getLogger(__name__)

# The sources a pull read, and a call that reads their version words (`refit.staging.StagingPool.read_words`).
Fences = tuple[Sequence[SourceRecord], Callable[[Sequence[SourceRecord]], list[int]]]


class CatalogVersions:
    """Resolves and re-checks versions of the model `name` through `client` (owned by the caller)."""

    def __init__(self, client: CatalogClient, name: str, *, on_after_wire: Callable[[int], None] | None = None) -> None:
        self._client = client
        self._name = name
        self._on_after_wire = on_after_wire

    def resolve(self, version: int | None, deadline: float, known: str = "", ranks: tuple[int, ...] = ()) -> Resolved:
        """The version to pull (None: the newest READY one) and its sources, in one round trip when READY.

        With `known`, the layout digest of a cached plan, and `ranks`, the trainer ranks it reads, the
        catalog sends only those ranks' records and, when the digest still matches, without tensor
        descriptors (a few hundred bytes per rank, however large the trainer world). When it does not
        (the layout changed), the version is resolved again in full.
        """
        while True:
            try:
                resolved = self._client.resolve(name=self._name, version=version, known_layout=known, ranks=ranks)
            except VersionNotFoundError:
                if version is None:
                    if time.monotonic() > deadline:
                        raise VersionNotFoundError(f"no READY version of {self._name!r} in the catalog") from None
                    time.sleep(DEFAULT_TIMEOUTS.poll_s)
                    continue
                resolved = None
            if resolved is not None and resolved.info.state is VersionState.READY:
                if ranks and not resolved.tensors_omitted:
                    # A new layout: a new plan needs every rank's records, of this same version.
                    return self._client.resolve(name=self._name, version=resolved.info.version)
                return resolved
            # A pinned version not READY (or not published) yet: wait for it; this raises if it is
            # retired, or not READY by the deadline.
            assert version is not None  # the newest READY version is READY
            remaining = max(deadline - time.monotonic(), MIN_WAIT_S)
            self._client.wait_ready(name=self._name, version=version, timeout_s=remaining)

    def check_ready(self, version: int, *, torn: bool, fences: Fences | None = None) -> None:
        """The seqlock check: a version retired while we read may have been overwritten mid-pull."""
        self.start_check(version, torn=torn, fences=fences)()

    def start_check(self, version: int, *, torn: bool, fences: Fences | None = None) -> Callable[[], None]:
        """Start the re-check after a pull; the returned call waits for its answer and raises if the
        version was retired (or its bytes changed) meanwhile.

        With `fences` (the sources read, and how to read their version words) and a word on every
        one of them (`SourceRecord.fence_addr`), the words are read now: one 8-byte READ per source
        over NIXL, or a load from the shared page of a source on this host, instead of a catalog
        round trip. Otherwise the catalog is asked. `torn`: the engine's memory already holds bytes
        of this version (the error says so).
        """
        if self._on_after_wire is not None:
            self._on_after_wire(version)
        mixed = "the engine's weights are mixed until a refit completes" if torn else "nothing installed"
        if fences is not None and have_words(fences[0]):
            sources, read_words = fences
            changed = [s.rank for s, word in zip(sources, read_words(sources), strict=True) if word != version]

            def words() -> None:
                if changed:
                    raise VersionRetiredError(
                        f"version {version} of {self._name!r} was retired during the pull (its bytes on "
                        f"trainer rank(s) {changed} changed or are changing); {mixed}"
                    )

            return words
        answer = self._client.version_state_later(name=self._name, version=version)

        def finish() -> None:
            state = answer()
            if state is not VersionState.READY:
                raise VersionRetiredError(
                    f"version {version} of {self._name!r} became {state.value} during the pull; {mixed}"
                )

        return finish

    def mismatch(self, exc: DigestError, version: int) -> RefitError:
        """A streamed chunk failed its digest: a race if the version was retired meanwhile, else corruption."""
        state = self._client.version_state(name=self._name, version=version)
        if state is not VersionState.READY:  # the trainer may have overwritten the bytes: not corruption
            return VersionRetiredError(
                f"version {version} of {self._name!r} became {state.value} during the pull; "
                "the engine's weights are mixed until a refit completes"
            )
        return DigestError(f"{exc}; the engine's weights are mixed until a refit completes", tensor=exc.tensor,
                           rank=exc.rank, version=exc.version, block=exc.block)  # fmt: skip

    def retry_digest(self, exc: DigestError, version: int | None, deadline: float) -> None:
        """Raise `exc` unless an unpinned refit can pull a newer version (the same bytes would fail again)."""
        latest = None if version is not None or time.monotonic() > deadline else self._client.latest(name=self._name)
        if latest is None or latest.version <= exc.version:
            raise exc
        logger.warning("%s: %s; retrying with the newest version", self._name, exc)
