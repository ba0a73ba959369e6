"""refit: RDMA weight refit for RL post-training.

Trainer ranks publish native Megatron-Core shards (`Publisher.stream_weights`), a catalog keeps
versions and descriptors (`CatalogServer`), and inference ranks pull exactly the bytes they need
over NIXL and install them into a running engine (`Receiver.update_weights`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from refit.errors import (
    CatalogError,
    CatalogUnavailableError,
    ConfigError,
    ConflictError,
    DependencyError,
    DigestError,
    LayoutError,
    LeaseExpiredError,
    ModelMismatchError,
    RankTakenError,
    RefitError,
    SourceDeadError,
    TransferTimeoutError,
    TransportError,
    VersionFailedError,
    VersionNotFoundError,
    VersionNotReadyError,
    VersionRetiredError,
)
from refit.types import ModelMeta, Role, UpdateResult, VersionInfo, VersionState

if TYPE_CHECKING:
    from refit.catalog.client import CatalogClient
    from refit.receiver import Receiver
    from refit.trainer.publisher import Publisher
    from refit_server import CatalogServer

__version__ = "0.1.0"

# Heavy pieces (torch, gRPC, megatron, NIXL) load on first use, so `import refit` stays cheap.
_LAZY = {
    "CatalogServer": "refit_server",
    "CatalogClient": "refit.catalog.client",
    "Publisher": "refit.trainer.publisher",
    "Receiver": "refit.receiver",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'refit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "CatalogClient",
    "CatalogError",
    "CatalogServer",
    "CatalogUnavailableError",
    "ConfigError",
    "ConflictError",
    "DependencyError",
    "DigestError",
    "LayoutError",
    "LeaseExpiredError",
    "ModelMeta",
    "ModelMismatchError",
    "Publisher",
    "RankTakenError",
    "Receiver",
    "RefitError",
    "Role",
    "SourceDeadError",
    "TransferTimeoutError",
    "TransportError",
    "UpdateResult",
    "VersionFailedError",
    "VersionInfo",
    "VersionNotFoundError",
    "VersionNotReadyError",
    "VersionRetiredError",
    "VersionState",
]
