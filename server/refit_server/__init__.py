"""refit_server: the refit catalog service (gRPC server, stores, `refit-catalog` CLI).

Depends only on `refit.{errors,types,proto,catalog.wire}`; the client library never imports it.
"""

from __future__ import annotations

from refit_server.server import CatalogServer

__all__ = ["CatalogServer"]
