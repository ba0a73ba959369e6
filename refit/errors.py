"""The `RefitError` hierarchy: every failure a caller of refit can see."""

from __future__ import annotations

from collections.abc import Sequence


class RefitError(Exception):
    """Base class of every error refit raises on purpose."""


class ConfigError(RefitError, ValueError):
    """An argument or setting is invalid; raised before any side effect."""


class DependencyError(ConfigError):
    """An installed dependency (megatron-core, vLLM, NIXL) lacks an internal refit relies on.

    Raised by `refit.compat`; the message names the installed version and the versions refit was
    tested with, so an upgrade that moved an internal is recognisable at once.
    """


# --- catalog -------------------------------------------------------------------------------------


class CatalogError(RefitError):
    """The catalog refused or failed a request."""


class AuthError(CatalogError):
    """The catalog refused the caller's credentials; nothing was changed.

    No token or a wrong one (gRPC UNAUTHENTICATED), or `permission_denied`: a read-only token on a
    call that changes the catalog (PERMISSION_DENIED). The message never contains a token.
    """

    def __init__(self, message: str, *, permission_denied: bool = False) -> None:
        super().__init__(message)
        self.permission_denied = permission_denied


class CatalogUnavailableError(CatalogError):
    """The catalog could not be reached (or did not answer in time)."""


class VersionNotFoundError(CatalogError):
    """The catalog has no such weight version."""


class VersionNotReadyError(CatalogError):
    """A version did not become READY in time; `missing_ranks` never published."""

    def __init__(self, message: str, *, version: int = -1, missing_ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.version = version
        self.missing_ranks = tuple(missing_ranks)


class VersionRetiredError(CatalogError):
    """The version was retired: its bytes may already be overwritten by the trainer."""


class VersionFailedError(CatalogError):
    """The version FAILED: a trainer rank's lease lapsed before every rank had published; never READY."""


class LeaseExpiredError(CatalogError):
    """A heartbeat found the rank no longer held by the caller: its lease lapsed (or it was taken over).

    The catalog has already failed the rank's STAGING versions and marked it dead in its READY ones;
    the publisher claims the rank again and publishes a new version.
    """


class RankTakenError(CatalogError):
    """Another publisher already holds this trainer rank."""


class ConflictError(CatalogError):
    """A publication disagrees with what the catalog already holds for the version."""


# --- layout and planning ---------------------------------------------------------------------------


class LayoutError(RefitError):
    """A model, a layout or a descriptor cannot be handled."""


class ModelMismatchError(LayoutError):
    """The engine's model (architecture, shapes, dtypes) does not match the catalog's model."""


# --- transport -----------------------------------------------------------------------------------------


class TransportError(RefitError):
    """A NIXL transfer, registration or connection failed; `agent_name` names the remote agent, if one."""

    def __init__(self, message: str, *, agent_name: str = "") -> None:
        super().__init__(message)
        self.agent_name = agent_name


class TransferTimeoutError(TransportError):
    """A transfer did not complete before its deadline."""


class SourceDeadError(TransportError):
    """Trainer ranks a refit needs are dead (lease lapsed, or a read from them failed) and no live
    replica holds their bytes; `ranks` and `agents` name them. Nothing was installed from them."""

    def __init__(self, message: str, *, ranks: Sequence[int] = (), agents: Sequence[str] = ()) -> None:
        super().__init__(message, agent_name=agents[0] if agents else "")
        self.ranks = tuple(ranks)
        self.agents = tuple(agents)


# --- integrity ----------------------------------------------------------------------------------------


class DigestError(RefitError):
    """Bytes a receiver pulled do not match the digest their trainer rank published with them.

    Raised before any of those bytes reach the engine (whole installs keep the old weights; a
    streamed refit leaves the engine torn). Names the tensor, the trainer rank and the block.
    """

    def __init__(self, message: str, *, tensor: str = "", rank: int = -1, version: int = -1, block: int = -1) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.rank = rank
        self.version = version
        self.block = block


# --- engines -------------------------------------------------------------------------------------------


class EngineError(RefitError):
    """An inference engine refused or failed an update (it keeps its previous weights)."""


class TornWeightsError(EngineError):
    """An engine's weights are a mix of versions: a streamed install failed after it began writing
    (a read failed, or the version was retired mid-pull) and no later refit has completed. Unlike
    other `EngineError`s the engine does not keep its previous weights; it must not serve until a
    refit completes."""


class RankVersionMismatchError(EngineError):
    """The tensor-parallel ranks of one engine were asked to install different versions."""
