"""Trainer-side steps for the authentication tests: `refit_ops.publish` with a catalog token.

The publisher is kept in the same `state["publishers"]` as `refit_ops`, so `Trainer.close` (which
calls `refit_ops.close_publisher`) closes it like any other.
"""

from __future__ import annotations

from typing import Any


def publish(
    state: dict,
    rank: int,
    world_size: int,
    *,
    key: str,
    catalog: str,
    version: int,
    token: str,
    vocab_size: int = 0,
    tls_ca: str | None = None,
) -> dict[str, Any]:
    from refit import Publisher

    pubs = state.setdefault("publishers", {})
    if key not in pubs:
        pubs[key] = Publisher(
            catalog=catalog, model=state[key], name=key, vocab_size=vocab_size, token=token, tls_ca=tls_ca
        )
    info = pubs[key].stream_weights(version)
    return {"rank": rank, "state": info.state.value}


def publish_refused(state: dict, rank: int, world_size: int, *, key: str, catalog: str, token: str) -> str:
    """A publisher built with `token` (a reader's, say): the error class its claim fails with."""
    from refit import Publisher
    from refit.errors import RefitError

    try:
        Publisher(catalog=catalog, model=state[key], name=f"{key}-refused", token=token).close()
    except RefitError as exc:
        return type(exc).__name__
    return "accepted"
