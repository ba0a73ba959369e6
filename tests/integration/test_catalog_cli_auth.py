"""`refit-catalog serve --trainer-token-file F --reader-token-file G` in a subprocess, inspected with
`list --token-file` and `$REFIT_CATALOG_TOKEN`; the tokens appear in none of its output."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest

from refit.catalog.client import TOKEN_ENV, CatalogClient
from refit.errors import AuthError
from tests.integration.test_catalog_cli import CLI, ENV
from tests.support import catalog_samples as samples
from tests.support.catalog_procs import first_line

TRAINER = "cli-trainer-4e7a0c2d9f"
READER = "cli-reader-1b5f8a3e6d"


def test_serve_with_token_files(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    (tmp_path / "trainer").write_text(TRAINER + "\n")
    (tmp_path / "reader").write_text(READER + "\n")
    env = {k: v for k, v in ENV.items() if k != TOKEN_ENV}
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--log-level", "DEBUG",
         "--trainer-token-file", str(tmp_path / "trainer"), "--reader-token-file", str(tmp_path / "reader")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        bound = re.fullmatch(r"refit catalog serving on (127\.0\.0\.1:\d+)\n", first_line(proc, 60.0))
        assert bound is not None
        address = bound.group(1)
        with CatalogClient(address, token=TRAINER) as trainer:
            trainer.publish(name="m", version=1, world_size=1, model=samples.MODEL, source=samples.source(0))
        with CatalogClient(address, token=READER) as reader, pytest.raises(AuthError):
            reader.retire(name="m", version=1)

        def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*CLI, *args], capture_output=True, text=True, env={**env, **extra}, timeout=60, check=False
            )

        refused = run("list", "--catalog", address)
        assert refused.returncode == 1 and "AuthError" in refused.stderr
        by_file = run("list", "--catalog", address, "--json", "--token-file", str(tmp_path / "reader"))
        assert by_file.returncode == 0, by_file.stderr
        assert [v["version"] for v in json.loads(by_file.stdout)] == [1]
        by_env = run("show", "m", "1", "--catalog", address, **{TOKEN_ENV: READER})
        assert by_env.returncode == 0 and "READY" in by_env.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "refused" in err  # the refused `list` was logged, without the token
    for text in (out, err, refused.stdout, refused.stderr, by_file.stderr, by_env.stderr):
        assert TRAINER not in text and READER not in text


def test_unreadable_token_file_is_one_line_exit_1(tmp_path) -> None:
    done = subprocess.run(
        [*CLI, "serve", "--port", "0", "--trainer-token-file", str(tmp_path / "missing")],
        capture_output=True, text=True, env=ENV, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("refit-catalog: ConfigError: cannot read the trainer token file")
