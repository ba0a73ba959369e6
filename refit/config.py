"""Timeouts and polling intervals every refit component shares, in one frozen value.

Receivers, the vLLM backend, the one-call drivers and the fleet take a `Timeouts` (or the single
numbers they need from it) instead of repeating literals; `DEFAULT_TIMEOUTS` holds the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from refit.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeouts:
    """Deadlines (seconds) of refit's waits; every wait in refit has one.

    Attributes:
        update_s: a whole update: waiting for a READY version plus the pull.
        catalog_s: one catalog call.
        grace_s: what a waiter adds to a deadline another party enforces itself, so that party's
            own timeout error (which names what was late) arrives before the waiter gives up.
        poll_s: interval between polls of a state that has no push notification.
        lease_s: a publisher's lease on its trainer rank: when the catalog hears no heartbeat for
            this long, the rank is dead (its STAGING versions FAIL, its READY ones list it as dead).
        heartbeat_s: interval of a publisher's heartbeats; a fraction of `lease_s` (at most half),
            so one late or lost heartbeat does not lapse the lease.
    """

    update_s: float = 120.0
    catalog_s: float = 10.0
    grace_s: float = 5.0
    poll_s: float = 0.05
    lease_s: float = 30.0
    heartbeat_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("update_s", "catalog_s", "poll_s", "lease_s", "heartbeat_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"Timeouts.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.grace_s >= 0:
            raise ConfigError(f"Timeouts.grace_s must be >= 0, got {self.grace_s!r}")
        check_lease(self.lease_s, self.heartbeat_s)


def check_lease(lease_s: float, heartbeat_s: float) -> None:
    """A lease must outlive at least two heartbeats, so one late heartbeat does not lapse it."""
    if not (lease_s > 0 and heartbeat_s > 0 and heartbeat_s * 2 <= lease_s):
        raise ConfigError(f"need lease_s > 0 and 0 < heartbeat_s <= lease_s / 2, got {lease_s!r} and {heartbeat_s!r}")


DEFAULT_TIMEOUTS = Timeouts()

MIN_WAIT_S = 0.001  # a wait whose deadline has passed still gets this long, so it fails by its own error
