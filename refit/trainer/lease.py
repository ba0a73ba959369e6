"""A publisher's lease on its trainer rank, renewed by heartbeats on a daemon thread.

The catalog considers a rank dead once it has heard no heartbeat for `lease_s`: it fails the rank's
STAGING versions and marks the rank dead in its READY ones (docs/catalog.md, "Leases"). A process
that dies stops heartbeating with it; one that stalls (stopped, partitioned) for longer than the
lease is treated as dead too, and on its next heartbeat learns its lease lapsed: it claims the rank
again (the versions it published before are lost; the next one it publishes is new).
"""

from __future__ import annotations

import logging
import threading

from refit.catalog.client import CatalogClient
from refit.config import check_lease
from refit.errors import LeaseExpiredError, RefitError

logger = logging.getLogger(__name__)


class Lease:
    """Holds `rank` of `name` for `agent_name` as a lease of `lease_s`, renewed every `heartbeat_s`.

    `claim()` takes the rank (raising RankTakenError as `CatalogClient.claim` does) and starts the
    heartbeat thread; `ensure()` re-claims a lapsed lease (before a publish); `stop()` ends the thread.
    Thread-safe.
    """

    def __init__(
        self, client: CatalogClient, *, name: str, rank: int, agent_name: str, lease_s: float, heartbeat_s: float
    ) -> None:
        check_lease(lease_s, heartbeat_s)
        self._client, self._name, self._rank, self._agent = client, name, rank, agent_name
        self.lease_s, self.heartbeat_s = lease_s, heartbeat_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lapsed = False  # the catalog said the lease lapsed; not yet claimed again
        self.lapses = 0  # how many times it lapsed so far
        self.renewals = 0  # successful claims and heartbeats: the catalog heard this rank

    def claim(self, *, takeover: bool = False) -> None:
        with self._lock:
            self._client.claim(
                name=self._name, rank=self._rank, agent_name=self._agent, takeover=takeover, lease_s=self.lease_s
            )
            self.lapsed = False
            self.renewals += 1
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"refit-lease-{self._name}-r{self._rank}", daemon=True
            )
            self._thread.start()

    def ensure(self) -> None:
        """Claim the rank again if its lease lapsed (RankTakenError if another agent took it meanwhile)."""
        if self.lapsed:
            self.claim()
            logger.warning("%s rank %d: lease re-claimed after it lapsed", self._name, self._rank)

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.beat()

    def beat(self) -> None:
        """One heartbeat; a lapsed lease is claimed again at once. Never raises (it runs on the thread)."""
        try:
            with self._lock:
                self._client.heartbeat(name=self._name, rank=self._rank, agent_name=self._agent)
                self.renewals += 1
        except LeaseExpiredError as exc:
            self.lapsed, self.lapses = True, self.lapses + 1
            logger.error("%s rank %d: %s", self._name, self._rank, exc)
            try:
                self.ensure()
            except RefitError as again:
                logger.error("%s rank %d: cannot claim again: %s", self._name, self._rank, again)
        except RefitError as exc:  # the catalog is away: keep trying; the lease may lapse meanwhile
            logger.warning("%s rank %d: heartbeat failed: %s", self._name, self._rank, exc)

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            # A heartbeat in flight ends within the client's deadline.
            thread.join(self.heartbeat_s + self._client.timeout_s)
