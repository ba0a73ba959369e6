"""The fleet's own logic without vLLM: one server's refit over HTTP, skipping, `watch`, the servers file.

A stand-in for a dev-mode `vllm serve` answers the routes the fleet calls (real HTTP on a port it
binds itself) with what vLLM 0.32 answers; real servers run in tests/integration/test_vllm_fleet.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from refit.errors import ConfigError, VersionNotFoundError
from refit.vllm import fleet as fleet_mod
from refit.vllm.fleet import Fleet, ServerResult, VLLMServer, refit_one_server
from tests.support import ports

V = 4


class FakeVLLM:
    """The dev-mode routes of one vLLM server with the refit backend at engine TP 1.

    `replies` overrides a route's answer: a dict is sent as JSON, `b""` as an empty body, an int as
    that HTTP error status. `requests` records `(path, query, body)` of every call.
    """

    def __init__(self, *, weight_version: str = "1", replies: dict[str, Any] | None = None) -> None:
        self.weight_version = weight_version
        self.replies = replies or {}
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self._answer(json.loads(self.rfile.read(length) or b"null"))

            def _answer(self, body: Any) -> None:
                url = urlsplit(self.path)
                fake.requests.append((url.path, dict(parse_qsl(url.query)), body))
                reply = fake.reply(url.path, body)
                if isinstance(reply, int):
                    self.send_response(reply)
                    payload = json.dumps({"error": f"{url.path} failed"}).encode()
                else:
                    self.send_response(200)
                    payload = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def reply(self, path: str, body: Any) -> Any:
        if path in self.replies:
            return self.replies[path]
        if path == "/weight_info":
            return {"weight_version": self.weight_version}
        if path == "/collective_rpc":
            assert body["method"] == "weight_transfer_engine"
            v = body["kwargs"].get("version", V)
            return {"results": [{"tp_rank": 0, "version": v, "state": "staged", "bytes": 64, "wire_s": 0.5,
                                 "last": {"install_s": 0.25}}]}  # fmt: skip
        if path == "/finish_weight_update" and body.get("weight_version"):
            self.weight_version = body["weight_version"]
        if path == "/reset_prefix_cache":
            return {"success": True}
        return {"message": "ok"}

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.requests]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def servers() -> Iterator[list[FakeVLLM]]:
    started: list[FakeVLLM] = []
    yield started
    for s in started:
        s.close()


def _start(started: list[FakeVLLM], **kwargs: Any) -> FakeVLLM:
    started.append(FakeVLLM(**kwargs))
    return started[-1]


SWAP = ["/pause", "/start_weight_update", "/update_weights", "/finish_weight_update", "/reset_prefix_cache", "/resume"]
SEQUENCE = ["/init_weight_transfer_engine", "/collective_rpc", *SWAP, "/collective_rpc"]


def _refit(server: FakeVLLM) -> ServerResult:
    return refit_one_server(server.url, catalog="catalog:1", name="policy", version=V, replica=2, timeout_s=30.0)


def test_one_server_is_refitted_through_its_routes(servers: list[FakeVLLM]) -> None:
    server = _start(servers)
    r = _refit(server)
    assert r == ServerResult(
        url=server.url, version=V, bytes=64, bytes_per_rank=(64,), seconds=r.seconds, wire_s=0.5, stall_s=r.stall_s
    )
    assert server.paths() == SEQUENCE
    calls = {path: (query, body) for path, query, body in server.requests}
    assert calls["/pause"][0] == {"mode": "keep"}
    assert calls["/init_weight_transfer_engine"][1]["init_info"]["replica"] == 2
    assert calls["/update_weights"][1] == {"update_info": {"version": V}}
    assert calls["/finish_weight_update"][1] == {"weight_version": str(V)}
    assert calls["/reset_prefix_cache"][0] == {"reset_running_requests": "true"}


def test_an_empty_reset_answer_after_a_successful_update_is_not_a_failure(servers: list[FakeVLLM]) -> None:
    server = _start(servers, replies={"/reset_prefix_cache": b""})
    r = _refit(server)
    assert r.error is None and r.bytes == 64, r
    assert server.paths() == SEQUENCE


def test_a_refused_update_closes_the_session_and_resumes_the_server(servers: list[FakeVLLM]) -> None:
    server = _start(servers, replies={"/update_weights": 500})
    r = _refit(server)
    assert r.error is not None and r.error.startswith("EngineError: ") and "/update_weights: HTTP 500" in r.error
    assert r.bytes == 0 and r.version == V
    assert server.paths()[2:] == ["/pause", "/start_weight_update", "/update_weights", "/finish_weight_update",
                                  "/collective_rpc", "/resume"]  # fmt: skip
    assert server.requests[-3][2] == {}  # the session closed without a version (then the status: not torn)
    assert server.weight_version == "1"


def test_a_failed_pull_is_reported_before_the_server_pauses(servers: list[FakeVLLM]) -> None:
    failed = {"tp_rank": 0, "version": V, "state": "failed", "error": "differs", "error_type": "ModelMismatchError"}
    server = _start(servers, replies={"/collective_rpc": {"results": [failed]}})
    r = _refit(server)
    assert r.error == "ModelMismatchError: TP rank 0: differs"
    assert server.paths() == ["/init_weight_transfer_engine", "/collective_rpc"]


def test_reset_reads_vllms_answer_and_an_empty_body_says_nothing(servers: list[FakeVLLM]) -> None:
    assert VLLMServer(_start(servers).url).reset() is True
    assert VLLMServer(_start(servers, replies={"/reset_prefix_cache": {"success": False}}).url).reset() is False
    assert VLLMServer(_start(servers, replies={"/reset_prefix_cache": b""}).url).reset() is None


def test_the_fleet_skips_servers_on_the_version_and_reports_dead_ones(servers: list[FakeVLLM]) -> None:
    on_it, behind = _start(servers, weight_version=str(V)), _start(servers)
    with ports.closed_port() as port:
        dead = f"http://127.0.0.1:{port}"
        fleet = Fleet(catalog="catalog:1", name="policy", servers=[on_it.url, behind.url, dead], timeout_s=30.0)
        fleet.current = V  # as after a refit: sync goes to it without asking the catalog
        results = fleet.sync()
    assert [r.url for r in results] == [on_it.url, behind.url, dead]
    assert results[0] == ServerResult(url=on_it.url, version=V, skipped=True)
    assert results[1].error is None and not results[1].skipped and behind.weight_version == str(V)
    dead_error = results[2].error or ""
    assert dead_error.startswith("EngineError: ") and "/weight_info" in dead_error, results[2]
    assert on_it.paths() == ["/weight_info"]
    init = [body for path, _, body in behind.requests if path == "/init_weight_transfer_engine"]
    assert init[0]["init_info"]["replica"] == 1  # the order servers were added in


def test_a_server_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match="http://"):
        Fleet(catalog="catalog:1", servers=["127.0.0.1:8000"])


# -- watch ---------------------------------------------------------------------------------------------------


class ScriptedFleet(Fleet):
    """A fleet whose `refit` plays a script of outcomes (results or errors) instead of asking the catalog."""

    def __init__(self, script: list[Any], stop: threading.Event, **kwargs: Any) -> None:
        super().__init__(catalog="catalog:1", **kwargs)
        self.script, self.stop, self.seen = list(script), stop, []

    def refit(self, version: int | None = None) -> list[ServerResult]:
        self.seen.append(self.servers)
        outcome = self.script.pop(0)
        if not self.script:
            self.stop.set()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def test_watch_follows_new_servers_reports_refits_and_stops_on_the_event() -> None:
    stop = threading.Event()
    a, b = "http://a:1", "http://b:1"
    done = ServerResult(url=a, version=2, bytes=8)
    failed = ServerResult(url=b, version=2, error="EngineError: refused")
    script = [
        [ServerResult(url=a, version=1, skipped=True)],
        VersionNotFoundError("no READY version"),  # a tick without a version is retried
        [done, failed],
    ]
    fleet = ScriptedFleet(script, stop, servers=[a])
    listed = iter([[], [b], [b, a]])
    emitted: list[ServerResult] = []
    kwargs = {"interval_s": 0.001, "stop": stop, "on_result": emitted.append, "servers": lambda: next(listed)}
    watcher = threading.Thread(target=fleet.watch, kwargs=kwargs)
    watcher.start()
    watcher.join(timeout=60)
    assert not watcher.is_alive(), "watch did not stop when the event was set"
    assert fleet.seen == [[a], [a, b], [a, b]]
    assert emitted == [done, failed]  # skipped servers are silent


def test_watch_returns_at_once_when_already_stopped() -> None:
    stop = threading.Event()
    stop.set()
    fleet = ScriptedFleet([[]], stop)
    fleet.watch(interval_s=3600, stop=stop, on_result=lambda r: None)
    assert fleet.seen == []


# -- the servers file ----------------------------------------------------------------------------------------


def test_read_servers_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "servers.txt"
    path.write_text("# the fleet\nhttp://a:8000\n\n   http://b:8000  \n  # http://c:8000\n\t\n")
    assert fleet_mod._read_servers(str(path)) == ["http://a:8000", "http://b:8000"]


def test_the_cli_without_servers_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        fleet_mod.main(["--catalog", "catalog:1"])
    assert exited.value.code == 2 and "no servers" in capsys.readouterr().err
