"""The values of a vLLM refit: what to refit (`RefitPlan`), what happened (`RefitReport`), the steps of
the state machine in `flow.py` (`Step`), the engine calls it makes (`Control`, `AsyncControl`), and the
refit backend's `init_info`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from refit.catalog.channel import check_tls
from refit.config import DEFAULT_TIMEOUTS
from refit.errors import ConfigError

# Bugs in refit or in a caller's control, not an engine's answer: they keep their class.
PROGRAMMING_ERRORS: tuple[type[Exception], ...] = (
    TypeError,
    AttributeError,
    NameError,
    LookupError,
    AssertionError,
    ImportError,
    NotImplementedError,
)
REPAIR_ATTEMPTS = 3  # installs of the newest version tried while a torn engine stays paused
CONTROL_OPS = frozenset({"init", "rpc", "pause", "start", "update", "finish", "reset", "resume"})
RUNNER_OPS = frozenset({"resolve", "sleep"})


@dataclass(frozen=True, kw_only=True, slots=True)
class RefitReport:
    """What one refit of one engine did. Times in seconds, measured by the caller's clock except `wire_s`."""

    version: int
    bytes: int  # pulled by all ranks together
    bytes_per_rank: tuple[int, ...]
    wire_s: float  # the slowest rank's NIXL transfer (streamed: the prefetch's, plus what the install waited for)
    prefetch_s: float  # prefetch requested -> every rank staged (the engine kept generating)
    stall_s: float  # pause -> resume: the only time generation stopped
    install_s: float  # the slowest rank's install (layerwise reload)
    seconds: float  # the whole call
    staging_bytes: int = 0  # the most staging one rank held (engine memory beyond the weights)
    chunks: int = 1  # chunks of whole layers a rank streamed through its window (1: installed whole)
    prefetched_chunks: int = 1  # of those, pulled before the pause (the rest were pulled during it)
    repairs: int = 0  # installs of a newer version after a streamed install tore the weights


@dataclass(frozen=True, kw_only=True, slots=True)
class RefitPlan:
    """What to refit an engine to, and the deadlines of the refit.

    Attributes:
        version: the version to install; None: the newest READY one.
        ready: `version` is already known to be READY (the fleet resolves it once for all its servers),
            so the catalog is not asked again.
        timeout_s: deadline of the pull (the backend's own) and of the prefetch wait (plus `grace_s`).
        max_staging_bytes: each worker's staging window (None: the backend's default, 1 GiB): a rank's
            weights that fit are prefetched whole; larger ones stream through it layer by layer.
        catalog_timeout_s: deadline of one catalog call (the driver's and each worker's).
        token: the catalog token, for the driver's calls and each worker's (None: each process's
            `$REFIT_CATALOG_TOKEN`, else none); kept out of the repr.
        tls_ca, tls_cert, tls_key: PEM files for a catalog served over TLS, as `Receiver`'s: used by
            the driver's lookup and sent to the workers (so the paths must hold on their machines too).
    """

    catalog: str
    name: str = "default"
    version: int | None = None
    ready: bool = False
    replica: int = 0
    timeout_s: float = DEFAULT_TIMEOUTS.update_s
    catalog_timeout_s: float = DEFAULT_TIMEOUTS.catalog_s
    poll_s: float = DEFAULT_TIMEOUTS.poll_s
    grace_s: float = DEFAULT_TIMEOUTS.grace_s
    token: str | None = field(default=None, repr=False)
    max_staging_bytes: int | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        check_tls(tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key)
        if self.max_staging_bytes is not None and (
            not isinstance(self.max_staging_bytes, int) or self.max_staging_bytes <= 0
        ):
            raise ConfigError(f"max_staging_bytes must be None or a positive int, got {self.max_staging_bytes!r}")
        if not self.catalog or not self.name:
            raise ConfigError(f"catalog and name must be set, got catalog={self.catalog!r} name={self.name!r}")
        if self.version is not None and (not isinstance(self.version, int) or self.version < 0):
            raise ConfigError(f"version must be None or a non-negative int, got {self.version!r}")
        if self.ready and self.version is None:
            raise ConfigError("ready=True needs the version it vouches for")
        if self.replica < 0:
            raise ConfigError(f"replica must be >= 0, got {self.replica}")
        for key in ("timeout_s", "catalog_timeout_s", "poll_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not self.grace_s >= 0:
            raise ConfigError(f"grace_s must be >= 0, got {self.grace_s!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Step:
    """One thing the machine asks its runner to do: a `Control` method, "sleep" or "resolve"."""

    op: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.op not in CONTROL_OPS | RUNNER_OPS:
            raise ConfigError(f"unknown refit step {self.op!r}")


class Control(Protocol):
    """The calls the machine makes on one engine (blocking). `rpc` reaches the refit backend of every
    TP rank (`collective_rpc("weight_transfer_engine", kwargs=...)`) and returns one dict per rank."""

    def init(self, info: dict[str, Any]) -> None: ...
    def rpc(self, **kwargs: Any) -> list[dict[str, Any]]: ...
    def pause(self) -> None: ...
    def start(self) -> None: ...
    def update(self, version: int) -> None: ...
    def finish(self, weight_version: str | None) -> None: ...
    def reset(self) -> bool | None: ...  # False: the prefix cache was not reset; None: the engine did not say
    def resume(self) -> None: ...


class AsyncControl(Protocol):
    """`Control` for an engine whose calls are coroutines (`AsyncLLM`)."""

    async def init(self, info: dict[str, Any]) -> None: ...
    async def rpc(self, **kwargs: Any) -> list[dict[str, Any]]: ...
    async def pause(self) -> None: ...
    async def start(self) -> None: ...
    async def update(self, version: int) -> None: ...
    async def finish(self, weight_version: str | None) -> None: ...
    async def reset(self) -> bool | None: ...
    async def resume(self) -> None: ...


# -- pure helpers -------------------------------------------------------------------------------------------


def tls_options(*, tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> dict[str, str]:
    """The TLS keyword arguments that are set (a plaintext catalog gets none)."""
    return {k: v for k, v in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)) if v is not None}


def init_info(
    *,
    catalog: str,
    name: str = "default",
    replica: int = 0,
    timeout_s: float = DEFAULT_TIMEOUTS.update_s,
    catalog_timeout_s: float = DEFAULT_TIMEOUTS.catalog_s,
    token: str | None = None,
    max_staging_bytes: int | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> dict[str, Any]:
    """The refit backend's `init_info` for `init_weight_transfer_engine` (`token`: the catalog token
    its workers present; None leaves it to each worker's `$REFIT_CATALOG_TOKEN`; `max_staging_bytes`:
    each worker's staging window, None for the backend's default; `tls_*`: PEM files, on the workers'
    machines, for a catalog served over TLS)."""
    if not catalog or replica < 0 or timeout_s <= 0 or catalog_timeout_s <= 0:
        raise ConfigError("catalog must be set, replica >= 0, timeout_s > 0 and catalog_timeout_s > 0")
    if max_staging_bytes is not None and max_staging_bytes <= 0:
        raise ConfigError(f"max_staging_bytes must be positive, got {max_staging_bytes}")
    check_tls(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    return {
        "catalog": catalog,
        "name": name,
        "replica": replica,
        "timeout_s": timeout_s,
        "catalog_timeout_s": catalog_timeout_s,
        **({"token": token} if token is not None else {}),
        **({"max_staging_bytes": max_staging_bytes} if max_staging_bytes is not None else {}),
        **tls_options(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key),
    }
