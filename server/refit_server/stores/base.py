"""The `Store` protocol every catalog back end implements, and the rules they share.

A store holds the catalog's state: versions (state, world size, model, per-rank source records) and
rank claims. The service validates requests before calling a store, so a store may assume names are
non-empty, ranks and versions non-negative and `source.rank < world_size`. Every store must behave
identically, so the checks' order and the errors' messages are defined once, here:

publish: (1) RETIRED version -> VersionRetiredError; (2) world size or model differs -> ConflictError;
(3) rank claimed by another agent -> RankTakenError; (4) rank's part published by another agent ->
RankTakenError; else store the part, creating the version in STAGING, and flip it to READY once every
rank 0..world_size-1 has published.

Leases: a claim made with `lease_s` > 0 lapses `lease_s` seconds after its last claim or heartbeat
(the store's clock: the server's for the memory store, Redis's TIME for the Redis store, so servers
sharing one Redis agree). Expiry is evaluated lazily and atomically at the start of every store call
that touches the model (reads included), before anything else: a lapsed claim is dropped and its rank
is dead: (1) every STAGING version of the model whose world holds the rank becomes FAILED (terminal:
publish raises VersionFailedError, retire leaves it FAILED); (2) every READY version whose part for
the rank was published by the lapsed agent lists the rank in `dead_ranks`. Both record the reason
(`lease_lost`) in `failure` ("; "-joined). A heartbeat from an agent that no longer holds the rank
raises LeaseExpiredError. Release and takeover drop a lease without killing the rank.

publish also refuses a FAILED version (VersionFailedError), checked with RETIRED, first.

Layout digest: publish also stores the part's source layout digest (`wire.source_encodings`) and its
head (the record without tensors), and, whenever every rank 0..world_size-1 has a part, the version's
layout digest (`version_layout`), so reads never recompute it. Until then the version's digest is "".

Retention (`keep_retired`): retire then deletes every RETIRED version of the model but the newest
`keep_retired` ones, with their source records, in the same atomic step, so a catalog that sees a
version per training step stays bounded. The store remembers the highest number it deleted per
model, so a deleted version (or any older number the model lacks) still reads as retired: get_state
answers RETIRED, get_version, get_sources and resolve raise VersionRetiredError (`deleted`), retire
changes nothing, and a publish into it is refused with VersionRetiredError: RETIRED stays final. It
is left out of list_versions and latest. None keeps every version; 0 deletes versions as they are
retired. STAGING and READY versions are never deleted.

Rank filter (`ranks`): get_sources and resolve return only those ranks' records (a receiver's plan
reads a few trainer ranks of many); empty means every rank; ranks the version lacks are skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from refit.catalog.values import Resolved
from refit.errors import (
    ConfigError,
    ConflictError,
    LeaseExpiredError,
    RankTakenError,
    VersionFailedError,
    VersionNotFoundError,
    VersionRetiredError,
)
from refit.types import Claim, ModelMeta, SourceRecord, VersionInfo, VersionState


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreCounts:
    """What the catalog holds, for its metrics: versions per state and rank claims held."""

    versions: dict[VersionState, int] = field(default_factory=dict)
    claims: int = 0


@runtime_checkable
class Store(Protocol):
    """Catalog state; every method is atomic with respect to every other."""

    def ping(self) -> None:
        """Raise CatalogUnavailableError if the back end cannot be reached."""

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def durability_warnings(self) -> list[str]:
        """What would make this store lose versions it acknowledged (logged at start-up); [] if nothing."""

    def claim(
        self, *, name: str, rank: int, agent_name: str, takeover: bool, now: float, lease_s: float = 0.0
    ) -> Claim:
        """Hold `rank` for `agent_name`; idempotent for the holder, RankTakenError for anyone else.

        `lease_s` > 0 (re)starts a lease of that length (the holder re-claiming renews it); 0: none.
        """

    def heartbeat(self, *, name: str, rank: int, agent_name: str) -> Claim:
        """Renew the holder's lease for its `lease_s`; LeaseExpiredError if `agent_name` does not hold it."""

    def release(self, *, name: str, rank: int, agent_name: str) -> None:
        """Drop the claim if `agent_name` holds it; otherwise do nothing."""

    def publish(
        self, *, name: str, version: int, world_size: int, model: ModelMeta, source: SourceRecord, now: float
    ) -> VersionInfo:
        """Add (or replace) one rank's part of a version; see the module docstring for the rules."""

    def get_version(self, *, name: str, version: int) -> VersionInfo:
        """The version, or VersionNotFoundError."""

    def get_state(self, *, name: str, version: int) -> VersionState:
        """The version's state alone, or VersionNotFoundError: the cheapest read a store has."""

    def latest(self, *, name: str, state: VersionState) -> VersionInfo | None:
        """The highest-numbered version of `name` in `state`, if any."""

    def list_versions(self, *, name: str | None) -> list[VersionInfo]:
        """Every version (of `name`, or of every name), sorted by (name, version)."""

    def get_sources(self, *, name: str, version: int, ranks: Sequence[int] = ()) -> list[SourceRecord]:
        """The published parts of a version (only `ranks`' when given), sorted by rank;
        VersionNotFoundError if unknown."""

    def resolve(self, *, name: str, version: int | None, known_layout: str, ranks: Sequence[int] = ()) -> Resolved:
        """The version (the newest READY one when `version` is None) with its sources, read atomically.

        Sources come without tensors when `known_layout` is non-empty and equals the version's layout
        digest, and only `ranks`' when given. VersionNotFoundError if the version is unknown, or
        `version` is None and none is READY.
        """

    def generation(self, *, name: str) -> str:
        """A token that changes whenever a `resolve` of a READY version of `name` could answer
        differently: a version made READY, a part republished into a READY version, a retire (and
        retention), a lapsed lease's kill; evaluated after the reaper, like every read. A part of a
        STAGING version need not change it. Never repeats for one store's data (it also changes when
        that data is lost and written anew). The catalog files cached `Resolve` replies of READY
        versions under it (`refit_server.replies`)."""

    def counts(self) -> StoreCounts:
        """Versions per state and claims held, over every name (for metrics; need not be atomic)."""

    def retire(self, *, name: str, version: int, and_older: bool) -> list[int]:
        """Mark the version (and with `and_older` every older one) RETIRED; returns what changed, ascending.

        Then deletes the model's RETIRED versions beyond the newest `keep_retired` (see the module
        docstring). VersionNotFoundError if the version is unknown and `and_older` is False.
        """


# --- retention and the rank filter -------------------------------------------------------------------

DEFAULT_KEEP_RETIRED = 2


def check_keep_retired(keep_retired: int | None) -> int | None:
    """`keep_retired` validated: None (keep every version) or an int >= 0."""
    if keep_retired is not None and (
        not isinstance(keep_retired, int) or isinstance(keep_retired, bool) or keep_retired < 0
    ):
        raise ConfigError(f"keep_retired must be None or an int >= 0, got {keep_retired!r}")
    return keep_retired


def selected(records: Iterable[int], ranks: Sequence[int]) -> list[int]:
    """The ranks of `records` to return, ascending: all of them, or those in `ranks`."""
    have = set(records)
    return sorted(have & set(ranks) if ranks else have)


# --- errors, worded once for every store -------------------------------------------------------------


def not_found(name: str, version: int) -> VersionNotFoundError:
    return VersionNotFoundError(f"{name!r} has no version {version}")


def no_ready(name: str) -> VersionNotFoundError:
    return VersionNotFoundError(f"{name!r} has no READY version")


def deleted(name: str, version: int) -> VersionRetiredError:
    return VersionRetiredError(
        f"{name!r} v{version} is RETIRED and its record was deleted by the catalog's retention (keep_retired)"
    )


def retired(name: str, version: int) -> VersionRetiredError:
    return VersionRetiredError(f"{name!r} v{version} is RETIRED; publish a newer version")


def failed(name: str, version: int, failure: str) -> VersionFailedError:
    return VersionFailedError(f"{name!r} v{version} FAILED ({failure}); publish a newer version")


def lease_lost(rank: int, agent_name: str) -> str:
    """The reason a lapsed lease records in `failure` (the Redis store's Lua writes the same text)."""
    return f"rank {rank} (agent '{agent_name}') lost its lease"


def lease_expired(name: str, rank: int, agent_name: str, holder: str | None) -> LeaseExpiredError:
    now = f"held by agent {holder!r}" if holder else "not held"
    return LeaseExpiredError(
        f"{name!r} rank {rank} is no longer held by agent {agent_name!r} ({now}): its lease lapsed or was "
        "taken over; claim it again and publish a new version"
    )


def rank_claimed(name: str, rank: int, holder: str, agent_name: str) -> RankTakenError:
    return RankTakenError(
        f"{name!r} rank {rank} is claimed by agent {holder!r}, not {agent_name!r} "
        "(pass takeover=True to take it over after a crash)"
    )


def rank_published(name: str, version: int, rank: int, holder: str, agent_name: str) -> RankTakenError:
    return RankTakenError(
        f"{name!r} v{version} rank {rank} was already published by agent {holder!r}, not {agent_name!r}"
    )


def model_differences(stored: ModelMeta, given: ModelMeta) -> list[str]:
    """`field: catalog X vs publish Y` for every field where two models differ."""
    return [
        f"{f}: catalog {getattr(stored, f)!r} vs publish {getattr(given, f)!r}"
        for f in ModelMeta.__dataclass_fields__
        if getattr(stored, f) != getattr(given, f)
    ]


def conflict(
    name: str, version: int, *, stored_world_size: int, world_size: int, stored_model: ModelMeta, model: ModelMeta
) -> ConflictError:
    diffs = model_differences(stored_model, model)
    if stored_world_size != world_size:
        diffs.insert(0, f"world_size: catalog {stored_world_size} vs publish {world_size}")
    return ConflictError(f"{name!r} v{version} disagrees with the catalog: " + "; ".join(diffs))


# --- the version's layout digest, computed once per publish ----------------------------------------------

LAYOUT_TAG = b"refit-layout-v1"


def version_layout(*, world_size: int, model: bytes, layouts: Mapping[int, str]) -> str:
    """The version's layout digest from its model bytes and its ranks' source layout digests.

    "" unless every rank 0..world_size-1 has a digest. SHA-1 (hex) because Redis Lua has only
    `redis.sha1hex`: lua.PUBLISH hashes exactly these bytes, so both stores give the same digest.
    The inputs are already SHA-256 digests and the model; this is a cache key, not a signature.
    """
    if len(layouts) != world_size or any(r not in layouts for r in range(world_size)):
        return ""
    parts = [LAYOUT_TAG, str(world_size).encode(), b"%d:%s" % (len(model), model)]
    parts += [f"{r}={layouts[r]}".encode() for r in range(world_size)]
    return hashlib.sha1(b"\n".join(parts)).hexdigest()
