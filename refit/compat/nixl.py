"""Every NIXL internal refit relies on, in one place (checked against nixl 1.5.1).

- The wheels' private API modules (`nixl_cu13._api`, `nixl_cu12._api`, `nixl._api`): the `nixl`
  meta package picks `nixl_cu13` as soon as it detects CUDA 13 tools, GPU or not, so refit imports
  the module matching the torch in the process itself.
- `nixl_agent.__init__` builds its pybind `nixlBind.nixlAgentConfig` and hard-codes `pthrDelay = 0`,
  which makes the UCX progress thread spin a whole core in every process holding an agent. No
  argument reaches it, so `create_agent` swaps the module's config class for a subclass that clamps
  `pthrDelay` while the agent is built.

NIXL is imported only inside these functions. When an upgrade moves one of them, the contract
tests (`tests/unit/test_compat_nixl.py`) fail with a message naming the installed version.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import threading
from types import ModuleType
from typing import Any

from refit.errors import TransportError

logger = logging.getLogger(__name__)

TESTED_VERSIONS = ("1.5.1",)

# The wheels' private API modules, by preference when no CUDA build decides.
API_MODULES = ("nixl_cu13._api", "nixl_cu12._api", "nixl._api")

_swap_lock = threading.Lock()  # the class swap changes a module global: one agent creation at a time


def installed_version() -> str:
    """The installed `nixl` distribution's version ("not installed" without one)."""
    try:
        return importlib.metadata.version("nixl")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def import_api(cuda_major: int | None) -> ModuleType:
    """Import NIXL's Python API from the wheel built for `cuda_major` (else any wheel that imports)."""
    candidates = [f"nixl_cu{cuda_major}._api"] if cuda_major else []
    candidates += [m for m in API_MODULES if m not in candidates]
    errors = []
    for name in candidates:
        try:
            api = importlib.import_module(name)
        except (ImportError, OSError) as exc:
            errors.append(f"{name}: {exc}")
            continue
        logger.debug("using NIXL from %s", name)
        return api
    raise TransportError(f"cannot import NIXL {installed_version()} (tried " + "; ".join(errors) + ")")


def clamped_config_class(api: ModuleType, min_progress_delay_us: int) -> type:
    """A subclass of `api.nixlBind.nixlAgentConfig` whose `pthrDelay` is never below the given delay."""
    base = api.nixlBind.nixlAgentConfig

    class _Config(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, key: str, value: object) -> None:
            if key == "pthrDelay":
                value = max(int(value), min_progress_delay_us)  # type: ignore[call-overload]
            super().__setattr__(key, value)

    return _Config


def create_agent(api: ModuleType, name: str, *, backends: list[str], progress_delay_us: int) -> Any:
    """`nixl_agent(name)` with `backends` and a UCX progress thread that sleeps `progress_delay_us`."""
    base = api.nixlBind.nixlAgentConfig
    with _swap_lock:
        api.nixlBind.nixlAgentConfig = clamped_config_class(api, progress_delay_us)
        try:
            return api.nixl_agent(name, api.nixl_agent_config(backends=backends))
        finally:
            api.nixlBind.nixlAgentConfig = base


def contract_problems(api: ModuleType) -> list[str]:
    """What `create_agent` relies on and `api` no longer provides (empty when all is in place)."""
    problems = []
    bind = getattr(api, "nixlBind", None)
    config_class = getattr(bind, "nixlAgentConfig", None)
    if not isinstance(config_class, type):
        problems.append("nixlBind.nixlAgentConfig is gone")
    elif not hasattr(config_class(), "pthrDelay"):
        problems.append("nixlBind.nixlAgentConfig has no pthrDelay attribute")
    else:
        config = clamped_config_class(api, 1000)()
        config.pthrDelay = 0
        if config.pthrDelay != 1000:
            problems.append("nixlAgentConfig.pthrDelay cannot be clamped by a subclass")
    if not callable(getattr(api, "nixl_agent_config", None)):
        problems.append("nixl_agent_config is gone")
    agent = getattr(api, "nixl_agent", None)
    if agent is None:
        problems.append("nixl_agent is gone")
    else:
        source = inspect.getsource(agent.__init__)
        if "nixlBind.nixlAgentConfig()" not in source or "pthrDelay" not in source:
            problems.append("nixl_agent.__init__ no longer builds nixlBind.nixlAgentConfig() and sets pthrDelay")
    return problems
