"""The Redis store's URL and key layout: `RedisConfig` (a parsed `redis://` URL) and `Keys`, one
builder per key (the layout itself is documented in `lua.py`, whose scripts build the same keys).

Kept apart from `redis.py` (the store's calls) so that checking a URL needs neither redis-py nor a
connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

from refit.errors import ConfigError

_QUERY_KEYS = ("prefix", "timeout_s")


@dataclass(frozen=True, kw_only=True, slots=True)
class RedisConfig:
    """A parsed `redis://` store URL."""

    host: str
    port: int
    db: int
    prefix: str = "refit"
    timeout_s: float = 5.0
    ssl: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def where(self) -> str:
        return f"redis at {self.host}:{self.port}/{self.db}"


def parse_url(url: str) -> RedisConfig:
    """Parse a store URL, raising ConfigError for anything malformed or unknown."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"store URL {url!r} is not redis:// or rediss://")
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ConfigError(f"store URL {url!r}: {exc}") from exc
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ConfigError(f"store URL {url!r}: database must be a number, got {path!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(_QUERY_KEYS))
    if unknown:
        raise ConfigError(f"store URL {url!r}: unknown options {unknown} (known: {list(_QUERY_KEYS)})")
    prefix = query.get("prefix", ["refit"])[-1]
    if not prefix:
        raise ConfigError(f"store URL {url!r}: prefix must be non-empty")
    try:
        timeout_s = float(query.get("timeout_s", ["5"])[-1])
    except ValueError as exc:
        raise ConfigError(f"store URL {url!r}: timeout_s: {exc}") from exc
    if timeout_s <= 0:
        raise ConfigError(f"store URL {url!r}: timeout_s must be positive")
    return RedisConfig(
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=int(path or 0),
        prefix=prefix,
        timeout_s=timeout_s,
        ssl=parts.scheme == "rediss",
        username=parts.username,
        password=parts.password,
    )


class Keys:
    """One builder per key; the layout is documented in `lua.py`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def names(self) -> str:
        return f"{self.prefix}:names"

    def model(self, name: str) -> str:
        """The model's key prefix (every script's last argument: the lease reaper's)."""
        return self._model(name)

    def _model(self, name: str) -> str:
        # Quoting keeps a ':' inside a model name from aliasing another model's keys.
        return f"{self.prefix}:m:{quote(name, safe='')}"

    def versions(self, name: str) -> str:
        return f"{self._model(name)}:versions"

    def claims(self, name: str) -> str:
        return f"{self._model(name)}:claims"

    def pruned(self, name: str) -> str:
        return f"{self._model(name)}:pruned"

    def version_prefix(self, name: str) -> str:
        return f"{self._model(name)}:v:"

    def version(self, name: str, version: int) -> str:
        return f"{self.version_prefix(name)}{version}"

    def sources(self, name: str, version: int) -> str:
        return f"{self.version(name, version)}:sources"

    def agents(self, name: str, version: int) -> str:
        return f"{self.version(name, version)}:agents"

    def layouts(self, name: str, version: int) -> str:
        return f"{self.version(name, version)}:layouts"

    def heads(self, name: str, version: int) -> str:
        return f"{self.version(name, version)}:heads"
