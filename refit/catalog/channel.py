"""The gRPC side of a catalog client: credentials, the channel, and gRPC statuses -> refit errors.

Protobuf and `grpc.RpcError` stay in `refit/catalog`: callers of `CatalogClient` see refit values and
the `RefitError` hierarchy only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grpc

from refit import errors
from refit.catalog import wire
from refit.catalog.bounds import CatalogLimits
from refit.errors import CatalogError, CatalogUnavailableError, ConfigError

logger = logging.getLogger(__name__)

# Only these classes may be named by the server; anything else falls back to the status code.
_ERRORS_BY_NAME: dict[str, type[errors.RefitError]] = {
    cls.__name__: cls
    for cls in (
        errors.CatalogError,
        errors.CatalogUnavailableError,
        errors.VersionNotFoundError,
        errors.VersionNotReadyError,
        errors.VersionRetiredError,
        errors.VersionFailedError,
        errors.LeaseExpiredError,
        errors.RankTakenError,
        errors.ConflictError,
        errors.ConfigError,
        errors.AuthError,
    )
}

TOKEN_ENV = "REFIT_CATALOG_TOKEN"
_AUTH = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def resolve_token(token: str | None) -> str | None:
    """`token`, or `$REFIT_CATALOG_TOKEN` when it is None; None (no credential) when both are unset.

    Refused before any call: a token gRPC metadata cannot carry (non-ASCII, whitespace) would
    otherwise fail later with a transport error that hides the cause. The message never shows it.
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
        source = f"${TOKEN_ENV}"
    else:
        source = "token"
    if token is None:
        return None
    if not isinstance(token, str) or not token or not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(f"{source} must be a non-empty string of printable ASCII without spaces")
    return token


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path!r}: {exc.strerror}") from exc


_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

# Back-off between the retries of a call whose catalog went away (a restart, a Redis fail-over).
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
FIRST_CONTACT_S = 1.0  # how long a client that never reached its catalog retries an unavailable one
# gRPC's own reconnect back-off grows to 120 s by default: a client would then find a restarted
# catalog long after its deadline. Capped, a channel retries its connection at least every second.
_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def check_tls(*, tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """The client's TLS options: a client certificate and key go together, and need a CA to check the server."""
    if (tls_cert is None) != (tls_key is None) or (tls_cert is not None and tls_ca is None):
        raise ConfigError("tls_cert and tls_key go together, and need tls_ca")


def open_channel(
    address: str,
    *,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    limits: CatalogLimits,
    dedicated: bool,
) -> grpc.Channel:
    """A gRPC channel to the catalog: TLS when `tls_ca` is given (mutual with `tls_cert`/`tls_key`),
    messages bounded by `limits`, reconnects capped at 1 s; `dedicated`: not shared in this process."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        *_RECONNECT_OPTIONS,
    ]
    if dedicated:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if tls_ca is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca, "tls_ca"),
        private_key=_read(tls_key, "tls_key"),
        certificate_chain=_read(tls_cert, "tls_cert"),
    )
    return grpc.secure_channel(address, credentials, options=options)


def answered(exc: grpc.RpcError) -> bool:
    """Whether the catalog itself answered a failed call: only the catalog names an error class."""
    metadata = (exc.trailing_metadata() if isinstance(exc, grpc.Call) else None) or ()
    return any(k == wire.ERROR_METADATA_KEY for k, _ in metadata)


def translate(address: str, timeout_s: float, method: str, exc: grpc.RpcError) -> errors.RefitError:
    """The RefitError of a failed call (the catalog's named class, else one for the status code)."""
    code: grpc.StatusCode = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
    metadata = (exc.trailing_metadata() if isinstance(exc, grpc.Call) else None) or ()
    named = next((v for k, v in metadata if k == wire.ERROR_METADATA_KEY), None)
    cls = _ERRORS_BY_NAME.get(named) if isinstance(named, str) else None
    logger.debug("catalog %s %s -> %s (%s): %s", address, method, code.name, named, details)
    if cls is CatalogUnavailableError or (cls is None and code in _UNAVAILABLE):
        return CatalogUnavailableError(
            f"catalog at {address} is unavailable ({method}: {code.name}, deadline {timeout_s:g}s): {details}"
        )
    if cls is errors.AuthError or (cls is None and code in _AUTH):
        return errors.AuthError(
            f"catalog at {address} refused {method} ({code.name}): {details}",
            permission_denied=code == grpc.StatusCode.PERMISSION_DENIED,
        )
    if cls is not None:
        return cls(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.VersionNotFoundError(details)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return errors.RankTakenError(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        retired = "retired" in details.lower()
        return errors.VersionRetiredError(details) if retired else errors.ConflictError(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ConfigError(details)
    return CatalogError(f"catalog at {address}: {method} failed with {code.name}: {details}")
