"""The catalog token on its way through the vLLM pieces: `init_info`, `RefitPlan`, the fleet's calls
to a server, and the backend's `RefitInitInfo`, and out of every repr."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from refit.vllm.fleet import refit_one_server
from refit.vllm.flow import RefitPlan, Step, init_info, refit_steps
from tests.unit.test_fleet import FakeVLLM

TOKEN = "vllm-token-9d3b7e1f2a"


def test_init_info_carries_the_token_only_when_given() -> None:
    assert init_info(catalog="c:1", token=TOKEN)["token"] == TOKEN
    assert "token" not in init_info(catalog="c:1")  # each worker's $REFIT_CATALOG_TOKEN then


def test_the_plan_passes_its_token_to_the_resolve_and_the_workers_but_not_its_repr() -> None:
    plan = RefitPlan(catalog="c:1", name="m", token=TOKEN)
    assert TOKEN not in repr(plan)
    steps = refit_steps(plan)
    resolve = next(steps)
    assert resolve.op == "resolve" and resolve.kwargs["token"] == TOKEN
    init = steps.send(3)
    assert init == Step(op="init", kwargs={"info": init_info(catalog="c:1", name="m", token=TOKEN)})
    plain = next(refit_steps(RefitPlan(catalog="c:1", name="m")))
    assert "token" not in plain.kwargs


@pytest.fixture
def server() -> Iterator[FakeVLLM]:
    s = FakeVLLM()
    yield s
    s.close()


def test_a_fleet_refit_sends_the_token_in_init_info(server: FakeVLLM) -> None:
    refit_one_server(server.url, catalog="c:1", name="m", version=2, replica=0, timeout_s=30.0, token=TOKEN)
    bodies = [body for path, _, body in server.requests if path == "/init_weight_transfer_engine"]
    assert [b["init_info"]["token"] for b in bodies] == [TOKEN]


def test_the_backend_init_info_keeps_the_token_out_of_its_repr() -> None:
    backend = pytest.importorskip("refit.vllm.backend")
    info = backend.RefitInitInfo(catalog="c:1", token=TOKEN)
    assert info.token == TOKEN and TOKEN not in repr(info)
    assert backend.RefitInitInfo(catalog="c:1").token is None
