"""`refit-catalog` as a user runs it: `serve --port 0` in a subprocess (the test reads the bound address from
its first line), then `list` and `show` (human and --json) via `python -m refit_server.cli`, against versions
published through the client."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from refit.catalog.client import CatalogClient
from tests.support import catalog_samples as samples
from tests.support.catalog_procs import first_line

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "server"), os.environ.get("PYTHONPATH", "")]),
}
CLI = [sys.executable, "-m", "refit_server.cli"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=60, check=False)


@pytest.fixture
def served(store_url: str) -> Iterator[str]:
    """`refit-catalog serve --port 0` running in a subprocess; yields the host:port it bound."""
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--store", store_url, "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        line = first_line(proc, 60.0)  # a deadline against a hung start only: it returns with the line
        bound = re.fullmatch(r"refit catalog serving on (127\.0\.0\.1:(\d+))\n", line)
        if bound is None or int(bound.group(2)) == 0:
            proc.kill()
            pytest.fail(f"serve did not report a bound port: {line!r} {proc.communicate(timeout=10)}")
        yield bound.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


SECRET_HANDLE = bytes(range(0xA0, 0xE0))  # 64 bytes, as a cudaIpcMemHandle_t


def _publish(address: str) -> None:
    with CatalogClient(address) as client:
        for r in range(2):  # "llama" v1: READY over 2 ranks
            client.publish(
                name="llama", version=1, world_size=2, model=samples.MODEL, source=samples.source(r, tp_size=2)
            )
        client.publish(name="llama", version=2, world_size=2, model=samples.MODEL, source=samples.source(0, tp_size=2))
        # A rank on a CUDA host publishes its GPU region's IPC handle: a capability `show` must never print.
        local = samples.source(0)
        ipc = replace(local.regions[0], ipc_handle=SECRET_HANDLE, ipc_offset=256)
        local = replace(local, regions=(ipc, local.regions[1]), host="b" * 32, fence_shm="refit-words-" + "c" * 32)
        client.publish(name="qwen", version=5, world_size=1, model=samples.MODEL, source=local)


def test_list_and_show(served: str) -> None:
    _publish(served)

    out = cli("list", "--catalog", served)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "STATE", "RANKS", "CREATED"]
    assert [ln.split()[:4] for ln in lines[1:]] == [
        ["llama", "1", "READY", "2/2"],
        ["llama", "2", "STAGING", "1/2"],
        ["qwen", "5", "READY", "1/1"],
    ]

    out = cli("list", "--catalog", served, "--name", "llama", "--json")
    assert out.returncode == 0, out.stderr
    versions = json.loads(out.stdout)
    assert [(v["name"], v["version"], v["state"]) for v in versions] == [("llama", 1, "READY"), ("llama", 2, "STAGING")]
    assert versions[1]["missing_ranks"] == [1] and versions[0]["model"]["hidden_size"] == 64

    out = cli("show", "llama", "1", "--catalog", served)
    assert out.returncode == 0, out.stderr
    assert "READY" in out.stdout and "2/2 published" in out.stdout and "llama, 2 layers" in out.stdout
    assert "tp1/2" in out.stdout and "agent-1" in out.stdout
    assert "decoder.layers.0.mlp.linear_fc1.weight" not in out.stdout  # tensors only with --tensors

    out = cli("show", "llama", "2", "--catalog", served, "--tensors")
    assert out.returncode == 0, out.stderr
    assert "missing: 1" in out.stdout
    tensor_lines = [ln for ln in out.stdout.splitlines() if ln.startswith("decoder.layers.0.mlp.linear_fc1.weight")]
    assert tensor_lines and tensor_lines[0].split()[1:5] == ["gated_mlp_column", "bfloat16", "128x64", "256x64"]

    out = cli("show", "llama", "1", "--catalog", served, "--json", "--tensors")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["state"] == "READY" and [s["rank"] for s in shown["sources"]] == [0, 1]
    src = shown["sources"][1]
    assert src["coords"]["tp_rank"] == 1 and src["num_tensors"] == 3 and len(src["tensors"]) == 3
    assert src["nbytes"] == sum(t.nbytes for t in samples.source(1, tp_size=2).tensors)
    assert src["tensors"][1] == {
        "name": "decoder.layers.0.mlp.linear_fc2.weight",
        "role": "row",
        "dtype": "bfloat16",
        "local_shape": [64, 64],
        "global_shape": [64, 128],
        "partition_dim": 1,
        "partition_stride": 1,
        "offset": 64,
        "region": 0,
        "byte_offset": 128 * 64 * 2,
        "nbytes": 64 * 64 * 2,
        "digest_block": 0,  # the sample record carries no digests
    }
    assert [r["cuda_ipc"] for r in src["regions"]] == [False, False] and src["host"] == ""

    out = cli("show", "qwen", "5", "--catalog", served, "--json")
    assert out.returncode == 0, out.stderr
    local = json.loads(out.stdout)["sources"][0]
    assert "tensors" not in local
    assert [r["cuda_ipc"] for r in local["regions"]] == [True, False] and local["regions"][0]["ipc_offset"] == 256
    assert all("ipc_handle" not in r for r in local["regions"])
    assert local["host"] == "b" * 32 and local["fence_shm"] == "refit-words-" + "c" * 32
    text = cli("show", "qwen", "5", "--catalog", served, "--tensors").stdout
    assert "0:cuda:0 48.0 KiB ipc, 1:cpu:0 4.0 KiB" in text
    for shown in (out.stdout, text):
        assert SECRET_HANDLE.hex() not in shown and repr(SECRET_HANDLE) not in shown


def test_errors_are_one_line_on_stderr_with_exit_1(served: str, closed_port: int) -> None:
    out = cli("show", "llama", "99", "--catalog", served)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "VersionNotFoundError" in out.stderr and "99" in out.stderr

    # A deadline far longer than a refused connection takes: the error must be the refusal (UNAVAILABLE).
    out = cli("list", "--catalog", f"127.0.0.1:{closed_port}", "--timeout-s", "45")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "CatalogUnavailableError" in out.stderr
    assert "UNAVAILABLE" in out.stderr and "DEADLINE_EXCEEDED" not in out.stderr


def test_empty_catalog_and_bad_store() -> None:
    out = cli("serve", "--store", "nosuch://x")
    assert out.returncode == 1 and "unknown catalog store" in out.stderr and out.stderr.count("\n") == 1


def test_list_on_an_empty_catalog(served: str) -> None:
    out = cli("list", "--catalog", served)
    assert out.returncode == 0 and out.stdout.strip() == "no versions"
    assert json.loads(cli("list", "--catalog", served, "--json").stdout) == []
