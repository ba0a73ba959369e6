"""`Authority`: who may call which catalog RPC.

Two credentials: the trainer token may do everything; the reader token may only read. With no token
configured every caller may do everything (local use only). Tokens arrive as gRPC metadata
(`authorization: Bearer <token>`), are compared in constant time, and appear in no message, log or
repr: errors say what was wrong (missing, not valid, read-only), never what was sent.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from refit.errors import AuthError, ConfigError

# RPCs that change the catalog: the trainer token only.
WRITE_RPCS = frozenset({"Claim", "Heartbeat", "Release", "Publish", "Retire"})
# RPCs anyone may call: a liveness probe tells nothing about the catalog's contents.
OPEN_RPCS = frozenset({"Ping"})
METADATA_KEY = "authorization"
_SCHEME = "bearer "


def check_token(token: str | None, what: str) -> str | None:
    """`token` if it can travel as gRPC metadata; ConfigError (not naming the token) otherwise."""
    if token is None:
        return None
    if not isinstance(token, str) or not token or not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(f"{what} must be a non-empty string of printable ASCII without spaces")
    return token


def read_token_file(path: str, what: str) -> str:
    """The token in file `path` (surrounding whitespace stripped); ConfigError if unreadable or empty."""
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} file {path!r}: {exc}") from exc
    if not token:
        raise ConfigError(f"the {what} file {path!r} is empty")
    checked = check_token(token, f"the {what} in {path!r}")
    assert checked is not None
    return checked


class Authority:
    """Decides each call from its metadata; `check` raises AuthError before any handler runs."""

    def __init__(self, *, trainer_token: str | None = None, reader_token: str | None = None) -> None:
        trainer = check_token(trainer_token, "trainer_token")
        reader = check_token(reader_token, "reader_token")
        if reader is not None and trainer is None:
            raise ConfigError("reader_token needs a trainer_token: otherwise anyone could publish")
        if reader is not None and trainer is not None and hmac.compare_digest(reader.encode(), trainer.encode()):
            raise ConfigError("reader_token and trainer_token must differ")
        self._trainer = trainer.encode() if trainer else None
        self._reader = reader.encode() if reader else None

    @property
    def enabled(self) -> bool:
        return self._trainer is not None

    def check(self, rpc: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Allow `rpc` for a caller presenting `metadata`, or raise AuthError (naming no token)."""
        if self._trainer is None or rpc in OPEN_RPCS:
            return
        given = [v for k, v in metadata or () if k == METADATA_KEY]
        if not given:
            raise AuthError(f"{rpc} needs a catalog token (authorization: Bearer metadata); none was sent")
        value = given[0] if len(given) == 1 else ""
        value = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        token = value[len(_SCHEME) :].encode() if value[: len(_SCHEME)].lower() == _SCHEME else b""
        # Both comparisons always run: which token matched must not show in the time taken.
        is_trainer = hmac.compare_digest(token, self._trainer)
        is_reader = self._reader is not None and hmac.compare_digest(token, self._reader)
        if not (is_trainer or is_reader):
            raise AuthError(f"{rpc}: the catalog token sent is not valid for this catalog")
        if rpc in WRITE_RPCS and not is_trainer:
            raise AuthError(f"{rpc} changes the catalog: a reader token may only read", permission_denied=True)

    @property
    def mode(self) -> str:
        """ "open", "trainer" or "trainer+reader": which credentials are configured (never what they are)."""
        return "open" if self._trainer is None else "trainer+reader" if self._reader else "trainer"

    def __repr__(self) -> str:
        return f"Authority({self.mode})"
