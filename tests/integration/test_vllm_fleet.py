"""Fleet refit of real `vllm serve` servers (dev mode, refit backend) on loopback, fed by a Megatron trainer.

Server A starts from version 2's checkpoint, so its first greedy outputs are those of a fresh server on
version 2. The fleet (A, plus a URL nothing listens on) is refitted to version 1; server B, also started
from version 2's checkpoint, joins later and `Fleet.sync()` brings it to version 1 too; then version 2 is
published and both are refitted back, where they must answer like a fresh version-2 server again.
Finally the `refit-fleet` CLI refits both to version 3. The unreachable server is reported as that
server's error each time, and never affects the others.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from refit.vllm.fleet import Fleet, ServerResult
from tests.support import ports
from tests.support import vllm_ops as vo
from tests.support.vllm_server import VLLMServerProcess

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture
def start_server(trainer_cluster, tmp_path):  # the trainers start first: vLLM takes the cores while it loads
    """Factory: `start_server(cpus)` starts a server from version 2's checkpoint; all are killed afterwards."""
    started: list[VLLMServerProcess] = []
    ckpt = vo.save_checkpoint(vo.LLAMA, 2, tmp_path / "ckpt-v2")

    def start(cpus: str) -> VLLMServerProcess:
        started.append(VLLMServerProcess(ckpt, tmp_path / f"server-{len(started)}.log", cpus=cpus))
        return started[-1].wait_ready(timeout_s=300.0)

    yield start
    for server in started:
        server.stop()


def _model_bytes(case) -> int:
    """Every parameter of the model: what one engine at TP 1 pulls (vLLM's vocab padding rows are not pulled)."""
    return sum(p.numel() * p.element_size() for p in vo.version_model(case, 1).parameters())


def _check_refitted(results: list[ServerResult], url: str, version: int, nbytes: int) -> ServerResult:
    (r,) = [r for r in results if r.url == url]
    assert r.error is None and not r.skipped, r
    assert r.version == version and r.bytes == nbytes and r.bytes_per_rank == (nbytes,), r
    assert 0 < r.stall_s <= r.seconds and 0 < r.wire_s <= r.seconds, r
    return r


def _check_unreachable(results: list[ServerResult], url: str) -> None:
    (r,) = [r for r in results if r.url == url]
    assert r.error is not None and "EngineError" in r.error and r.bytes == 0, r


def test_fleet_refits_running_servers_and_brings_late_joiners_to_the_current_version(
    start_server, trainer_cluster, catalog, tmp_path
) -> None:
    trainer = vo.Trainer(trainer_cluster, catalog, tmp_path, vo.LLAMA, tp=1)
    nbytes = _model_bytes(vo.LLAMA)
    dead = f"http://127.0.0.1:{ports.held_closed_port()}"  # refuses connections, and nothing else can take it
    try:
        a = start_server("0")
        fresh_v2 = a.greedy()

        # Version 1 to the fleet (A and the dead server): A is refitted, the dead one reported, A unaffected.
        trainer.publish(1)
        fleet = Fleet(catalog=catalog, name=trainer.name, servers=[a.url, dead], timeout_s=180.0)
        results = fleet.refit()
        assert [r.url for r in results] == [a.url, dead] and fleet.current == 1
        r1 = _check_refitted(results, a.url, 1, nbytes)
        _check_unreachable(results, dead)
        assert a.weight_version() == "1"
        on_v1 = a.greedy()
        assert on_v1 != fresh_v2

        # Server B joins later (started on version 2's weights): sync brings it to the fleet's version 1.
        b = start_server("1")
        assert b.greedy() == fresh_v2
        fleet.add(b.url)
        results = fleet.sync()
        (skipped,) = [r for r in results if r.url == a.url]
        assert skipped.skipped and skipped.error is None and skipped.version == 1
        _check_refitted(results, b.url, 1, nbytes)
        _check_unreachable(results, dead)
        assert b.weight_version() == "1" and b.greedy() == on_v1 == a.greedy()

        # Version 2 to every server: both answer like a fresh version-2 server again.
        trainer.publish(2)
        results = fleet.refit()
        r2 = [_check_refitted(results, s.url, 2, nbytes) for s in (a, b)]
        _check_unreachable(results, dead)
        assert a.greedy() == b.greedy() == fresh_v2
        assert a.weight_version() == b.weight_version() == "2"

        # Version 3 through the CLI: one JSON line per server, exit status 1 because of the dead server.
        trainer.publish(3)
        cli_base = [sys.executable, "-m", "refit.vllm.fleet", "--catalog", catalog, "--name", trainer.name]
        cli_base += ["--timeout-s", "180", "--server", a.url, "--server", b.url]
        done = subprocess.run([*cli_base, "--server", dead], capture_output=True, text=True, timeout=420)
        assert done.returncode == 1, done.stderr[-3000:]
        cli = [ServerResult(**{**d, "bytes_per_rank": tuple(d["bytes_per_rank"])}) for d in _json_lines(done.stdout)]
        assert [r.url for r in cli] == [a.url, b.url, dead]
        r3 = [_check_refitted(cli, s.url, 3, nbytes) for s in (a, b)]
        _check_unreachable(cli, dead)
        on_v3 = a.greedy()
        assert on_v3 == b.greedy() and on_v3 not in (fresh_v2, on_v1)
        assert a.weight_version() == b.weight_version() == "3"

        # Run again: both servers already serve version 3 and are skipped.
        done = subprocess.run(cli_base, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stderr[-3000:]
        assert [(d["url"], d["skipped"], d["error"]) for d in _json_lines(done.stdout)] == [
            (a.url, True, None),
            (b.url, True, None),
        ]
        print(
            f"\nfleet of 2 TP1 servers, {nbytes} bytes each: v1 A {r1.seconds:.2f}s (stall {r1.stall_s:.3f}s); "
            + "; ".join(f"v{v} {tag} {r.seconds:.2f}s (wire {r.wire_s:.3f}s, stall {r.stall_s:.3f}s)"
                        for v, rs in ((2, r2), (3, r3)) for tag, r in zip("AB", rs, strict=True))
        )  # fmt: skip
    finally:
        trainer.close()


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]
