"""Catalog stores: where the catalog's state lives, chosen by a URL.

`"memory"` is the embedded in-process store; `redis://host:port/db?prefix=P` keeps the catalog in
Redis. `check_url` validates a URL without connecting, so a bad one fails before anything is bound;
`open_store` builds the store (importing redis only when it is asked for).
"""

from __future__ import annotations

from refit.errors import ConfigError
from refit_server.stores.base import DEFAULT_KEEP_RETIRED, Store
from refit_server.stores.memory import MemoryStore


def check_url(url: str) -> None:
    """Raise ConfigError unless `url` names a known store."""
    if url == "memory":
        return
    if url.startswith(("redis://", "rediss://")):
        from refit_server.stores.redis_keys import parse_url

        parse_url(url)
        return
    raise ConfigError(f"unknown catalog store {url!r}: use 'memory' or 'redis://host:port/db[?prefix=P]'")


def open_store(url: str, *, keep_retired: int | None = DEFAULT_KEEP_RETIRED) -> Store:
    """Build the store `url` names, keeping `keep_retired` retired versions per model (None: all);
    it is not contacted yet (call `ping()`)."""
    check_url(url)
    if url == "memory":
        return MemoryStore(keep_retired=keep_retired)
    from refit_server.stores.redis import RedisStore

    return RedisStore(url, keep_retired=keep_retired)


__all__ = ["DEFAULT_KEEP_RETIRED", "MemoryStore", "Store", "check_url", "open_store"]
