"""Version safety when bytes land in live engine memory (streamed installs and direct reads).

The contract (docs/hooks.md): a streamed refit writes the engine as it goes, so the engine must not
serve during `install`; if a trainer step races the pull, the receiver finds the version retired
after the last byte, says the engine is torn, and an unpinned refit pulls the newest version again.
A reader that dies mid-pull holds nothing the trainer waits for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from refit import Receiver
from refit.engines import HFEngine
from refit.errors import VersionRetiredError
from tests.integration.test_refit_safety import Race
from tests.support import hf_models as hm
from tests.support.refit_harness import OPS, assert_same_weights

WINDOW = 64 << 10
ROOT = Path(__file__).resolve().parents[2]


def test_an_optimizer_step_racing_a_direct_pull_tears_then_the_newest_version_heals(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=1, pp=1)  # TP1 -> TP1: every large tensor is read straight into the engine
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    t.publish(1)
    race = Race()
    with Receiver(
        catalog=catalog, engine=HFEngine(engine_model), name=t.name, on_after_wire=race, max_staging_bytes=WINDOW,
        direct_min_bytes=0,
    ) as rcv:  # fmt: skip
        state: dict = {}

        def step(version: int) -> None:
            t.cluster.run(f"{OPS}:invalidate", name=t.name)  # what the optimizer hook does
            state[version] = t.step(seed=version)  # the bytes being pulled are overwritten
            t.publish(version)

        race.step = lambda: step(2)
        with pytest.raises(VersionRetiredError, match="mixed"):
            rcv.update_weights(version=1)  # pinned: the engine holds a mix, and says so
        assert rcv.torn
        assert rcv.plan is not None and rcv.plan.direct

        race.step = lambda: step(3)
        result = rcv.update_weights()  # unpinned: v2 raced by step 3 is pulled again as v3
        assert result.version == 3 and not rcv.torn
        assert_same_weights(engine_model, state[3])
        assert race.versions == [1, 2, 3]


_READER = textwrap.dedent(
    """
    import sys, time
    from refit import Receiver
    from refit.engines import HFEngine
    from tests.support import hf_models as hm

    def stall(version):
        print("pulled", flush=True)
        time.sleep(600)  # killed here, between the last byte and the READY re-check

    model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    with Receiver(catalog=sys.argv[1], engine=HFEngine(model), name=sys.argv[2], on_after_wire=stall,
                  max_staging_bytes=65536, direct_min_bytes=0) as rcv:
        rcv.update_weights(version=1)
    """
)


def test_a_reader_killed_mid_pull_holds_up_nobody(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=1, pp=1)
    t.publish(1)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "server"), os.environ.get("PYTHONPATH", "")])
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, catalog, t.name], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "pulled"  # its pull is done, its install not
        os.kill(reader.pid, signal.SIGKILL)
        reader.wait(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
    # The trainer steps and publishes without waiting on the dead reader, and a new reader is exact.
    start = time.monotonic()
    t.cluster.run(f"{OPS}:invalidate", name=t.name)
    v2 = t.step(seed=2)
    t.publish(2)
    assert time.monotonic() - start < 120  # a bound on a hang, not a timing claim
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=11)
    with Receiver(
        catalog=catalog, engine=HFEngine(engine_model), name=t.name, max_staging_bytes=WINDOW, direct_min_bytes=0
    ) as rcv:
        assert rcv.update_weights().version == 2
        assert_same_weights(engine_model, v2)
