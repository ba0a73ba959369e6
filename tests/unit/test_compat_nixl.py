"""Contract tests of `refit.compat.nixl`: the NIXL internals refit relies on, checked against the
installed NIXL. A failure names the installed version and the tested ones.
"""

from __future__ import annotations

from importlib import metadata

import pytest

from refit.compat import nixl as compat
from refit.transport.ucx import load_nixl_api

VERSIONS = f"installed nixl {compat.installed_version()}, tested {', '.join(compat.TESTED_VERSIONS)}"


def test_installed_version_is_the_distributions() -> None:
    assert compat.installed_version() == metadata.version("nixl")
    assert compat.TESTED_VERSIONS


def test_the_private_api_module_is_one_refit_knows() -> None:
    api = load_nixl_api()
    assert api.__name__ in compat.API_MODULES, f"NIXL API loaded from {api.__name__} ({VERSIONS})"


def test_the_agent_config_can_still_be_clamped() -> None:
    """`nixl_agent` builds `nixlBind.nixlAgentConfig()` and sets `pthrDelay`; a subclass clamps it."""
    problems = compat.contract_problems(load_nixl_api())
    assert not problems, f"NIXL internals moved ({VERSIONS}): " + "; ".join(problems)


def test_an_agent_is_created_and_the_config_class_is_put_back() -> None:
    api = load_nixl_api()
    base = api.nixlBind.nixlAgentConfig
    agent = compat.create_agent(api, "refit-compat-test", backends=["UCX"], progress_delay_us=1000)
    assert agent.name == "refit-compat-test"
    assert api.nixlBind.nixlAgentConfig is base, f"the swapped config class leaked ({VERSIONS})"


def test_an_unknown_cuda_build_falls_back_to_an_installed_wheel() -> None:
    api = compat.import_api(99)  # no nixl_cu99: the next candidate that imports
    assert api.__name__ in compat.API_MODULES


def test_contract_problems_name_what_moved() -> None:
    class NoBind:
        nixl_agent = None
        nixl_agent_config = None

    problems = compat.contract_problems(NoBind)  # type: ignore[arg-type]
    assert "nixlBind.nixlAgentConfig is gone" in problems
    assert "nixl_agent_config is gone" in problems
    assert "nixl_agent is gone" in problems


@pytest.mark.parametrize("delay", [0, 250])
def test_the_clamp_keeps_larger_delays(delay: int) -> None:
    config = compat.clamped_config_class(load_nixl_api(), delay)()
    config.pthrDelay = 500
    assert config.pthrDelay == max(500, delay)
