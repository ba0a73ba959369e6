"""`refit-catalog doctor`: a preflight of what a refit needs, each check bounded by a deadline.

Owns the checks and their verdicts; `cli.py` renders them. Checks: NIXL imports and is a version refit
was tested with (`refit.compat.nixl`), the backends and UCX settings it reports, a loopback READ
between two NIXL agents in this process, the catalog answering (Ping, then a read with the token from
`--token-file` or `$REFIT_CATALOG_TOKEN`), and Redis answering with persistence on. A check `fail`s
when refit cannot work that way; it `warn`s when refit works but something is off (an untested NIXL,
Redis without an append-only file).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from refit.errors import RefitError

logger = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail", "skip"]
LOOPBACK_BYTES = 1 << 20
UCX_ENV = ("UCX_TLS", "UCX_NET_DEVICES", "UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "UCX_RCACHE_MAX_UNRELEASED")


@dataclass(frozen=True, kw_only=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    """A check that raised is a failed check, with the error in its detail, never a crashed doctor."""
    try:
        return check()
    except Exception as exc:  # NIXL raises its own C++ exception types
        logger.debug("check %s raised", name, exc_info=True)
        return Check(name=name, status="fail", detail=f"{type(exc).__name__}: {' '.join(str(exc).split())}")


def check_nixl() -> Check:
    from refit.compat import nixl as compat
    from refit.transport.ucx import load_nixl_api

    version = compat.installed_version()
    api = load_nixl_api()
    problems = compat.contract_problems(api)
    if problems:
        return Check(name="nixl", status="fail", detail=f"nixl {version} ({api.__name__}): " + "; ".join(problems))
    if version not in compat.TESTED_VERSIONS:
        return Check(
            name="nixl",
            status="warn",
            detail=f"nixl {version} ({api.__name__}) imports, but refit was tested with {list(compat.TESTED_VERSIONS)}",
        )
    return Check(name="nixl", status="ok", detail=f"nixl {version} ({api.__name__}), tested version")


def check_backends() -> Check:
    from refit.transport.nixl import NixlAgent

    with NixlAgent(prefix="refit-doctor") as agent:
        backends = agent.backends()
    env = ", ".join(f"{k}={os.environ[k]}" for k in UCX_ENV if k in os.environ) or "no UCX_* overrides"
    if "UCX" not in backends["plugins"]:
        detail = f"NIXL has no UCX backend (plugins {backends['plugins']})"
        return Check(name="transports", status="fail", detail=detail)
    detail = (
        f"UCX memory {'/'.join(backends['ucx_memory'])}; UCX_TLS={os.environ.get('UCX_TLS', 'all (UCX default)')}; "
        f"{env}; plugins {','.join(backends['plugins'])}"
    )
    return Check(name="transports", status="ok", detail=detail)


def check_loopback(timeout_s: float) -> Check:
    """A READ of LOOPBACK_BYTES between two NIXL agents of this process, checked byte for byte."""
    import numpy as np

    from refit.transport.nixl import NixlAgent, ReadJob, ReadOp

    src = np.random.default_rng(7).integers(0, 256, LOOPBACK_BYTES, dtype=np.uint8)
    dst = np.zeros_like(src)
    with NixlAgent(prefix="refit-doctor-src") as remote, NixlAgent(prefix="refit-doctor-dst") as local:
        remote.register(src.ctypes.data, src.nbytes)
        local.register(dst.ctypes.data, dst.nbytes)
        local.connect(remote.name, remote.metadata())
        op = ReadOp(local_addr=dst.ctypes.data, remote_addr=src.ctypes.data, nbytes=src.nbytes)
        local.read([ReadJob(agent_name=remote.name, ops=[op])], timeout_s=timeout_s)
    if not np.array_equal(src, dst):
        wrong = int(np.count_nonzero(src != dst))
        return Check(name="loopback", status="fail", detail=f"READ of {src.nbytes} bytes: {wrong} bytes differ")
    return Check(name="loopback", status="ok", detail=f"NIXL READ of {src.nbytes} bytes between two agents: exact")


def check_catalog(address: str | None, *, timeout_s: float, token: str | None, tls_ca: str | None) -> Check:
    if not address:
        return Check(name="catalog", status="skip", detail="no --catalog given")
    from refit.catalog.client import TOKEN_ENV, CatalogClient

    with CatalogClient(address, timeout_s=timeout_s, token=token, tls_ca=tls_ca) as client:
        client.ping()
        try:  # Ping is open; a read proves the token (if any) is accepted
            versions = client.list_versions()
        except RefitError as exc:
            credential = "--token-file" if token else f"${TOKEN_ENV}" if os.environ.get(TOKEN_ENV) else "no token"
            detail = f"{address} answers Ping, but refuses a read ({credential}): {type(exc).__name__}: {exc}"
            return Check(name="catalog", status="fail", detail=detail)
    models = len({v.name for v in versions})
    return Check(name="catalog", status="ok", detail=f"{address} answers; {len(versions)} versions of {models} models")


def check_redis(url: str | None) -> Check:
    if not url:
        return Check(name="redis", status="skip", detail="no --redis given")
    from refit_server.stores.redis import RedisStore

    store = RedisStore(url, keep_retired=None)
    try:
        store.ping()
        settings = store.persistence()
        warnings = store.durability_warnings()
    finally:
        store.close()
    where = store.config.where
    shown = "CONFIG refused" if settings is None else ", ".join(f"{k} {v!r}" for k, v in settings.items())
    if warnings:
        return Check(name="redis", status="warn", detail=" ".join(warnings))
    return Check(name="redis", status="ok", detail=f"{where} answers; {shown}")


def run_checks(*, catalog: str | None, redis: str | None, timeout_s: float, token: str | None = None,
               tls_ca: str | None = None) -> list[Check]:  # fmt: skip
    """Every check, in order; the NIXL transfer checks are skipped when NIXL does not import."""
    results = [_guarded("nixl", check_nixl)]
    if results[0].status == "fail":
        results += [Check(name=n, status="skip", detail="NIXL does not import") for n in ("transports", "loopback")]
    else:
        results += [_guarded("transports", check_backends), _guarded("loopback", lambda: check_loopback(timeout_s))]
    results.append(_guarded("catalog", lambda: check_catalog(catalog, timeout_s=timeout_s, token=token, tls_ca=tls_ca)))
    results.append(_guarded("redis", lambda: check_redis(redis)))
    return results


def failed(checks: Sequence[Check]) -> bool:
    return any(c.status == "fail" for c in checks)
