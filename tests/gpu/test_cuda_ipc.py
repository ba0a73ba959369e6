"""Trainer ranks on the receiver's host read over CUDA IPC (`refit.transport.cuda_ipc`): GPUs, real NIXL.

A trainer rank (its own process, GPU 0, bf16 GPTModel in Megatron DDP with the distributed optimizer,
built by tests/support/ddp_ops.py) publishes its GPU regions with their IPC handles; a receiver in
this process (a plain-tensor engine on GPU `$REFIT_TEST_RECEIVER_GPU`, default 0, so the same GPU as
the trainer on a one-GPU machine) maps them and copies the bytes itself. Checked, per version:

1. version 0 (as built): the receiver's HF tensors equal the HF model the trainer was built from,
   bit for bit; every byte was copied over CUDA IPC (`stats.ipc_copies` or `stats.checked_copies`
   grew, nothing went through NIXL but the version words);
2. after an optimizer step, version 1 pulled over CUDA IPC (the pieces to un-interleave digested and
   copied by kernels straight out of the mapped memory, no staging) equals the step's all-gathered
   truth, converted by the test's own converter (its direct reads copied by kernels that digest them
   in the same pass, `refit.plan.checked_copy`); then version 2, pulled with `cuda_ipc=False` (over
   NIXL, no copy counted), equals its truth too, and so do version 3 with CUDA IPC again (the mapping
   kept) and `mapped_install=False` (those pieces staged), and version 4 copied out with digests off;
3. a second receiver process maps the trainer's memory, pulls version 4 and is killed (SIGKILL) before
   its re-check: the trainer steps and publishes version 5 without waiting for it;
4. an optimizer step (version 6) racing the pull of version 5 over CUDA IPC (kernels copying out of
   the mapped memory), after its last byte: the
   re-check reads the retired word from the shared page, the pinned pull says the engine is torn, and
   the next unpinned pull installs version 6, equal to its truth;
5. a receiver with a small window fetches version 6 ahead (its first chunks staged, as an engine does
   while it generates) and installs it (the rest copied out of the mapped memory), bit-exact and every
   byte verified.

`bash bench/scripts/gpu_cuda_ipc.sh` on the device tool (one H200 suffices).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from refit.errors import VersionRetiredError
from tests.support.cluster import TrainerCluster
from tests.support.ddp_check import differing, differing_from_hf, receiver

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RECEIVER_GPU = int(os.environ.get("REFIT_TEST_RECEIVER_GPU", "0"))
SMALL_WINDOW = 128 << 10  # bytes: the test model's 384 KiB of QKV to un-interleave stream through it in ~9 chunks
ROOT = Path(__file__).resolve().parents[2]

_READER = textwrap.dedent(
    """
    import sys, time
    import torch
    from tests.support.ddp_check import receiver

    def stall(version):
        print("pulled", rcv.stats.ipc_copies + rcv.stats.checked_copies, flush=True)
        time.sleep(600)  # killed here: the trainer's memory mapped, the re-check not done

    catalog, name, version, gpu = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rcv = receiver(catalog, name, version, torch.device("cuda", gpu), on_after_wire=stall)
    rcv.update_weights(version=version)
    """
)


def _kill_a_reader_mid_pull(catalog: str, name: str, version: int) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "server"), str(ROOT / "bench"),
                                                     os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    args = [sys.executable, "-c", _READER, catalog, name, str(version), str(RECEIVER_GPU)]
    reader = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None
        line = reader.stdout.readline().split()
        assert line[:1] == ["pulled"] and int(line[1]) > 0, line  # its bytes came over CUDA IPC
        os.kill(reader.pid, signal.SIGKILL)
        reader.wait(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()


def test_same_host_trainer_is_copied_over_cuda_ipc_bit_exact() -> None:
    from refit_server import CatalogServer

    name = "ipc-tp1"
    with (
        CatalogServer(store="memory", port=0).start() as server,
        TrainerCluster(world_size=1, cuda=True) as cluster,
    ):
        cluster.run("tests.support.ddp_ops:build", timeout_s=300, catalog=server.address, name=name, tp=1,
                    overlap=False, cuda=True)  # fmt: skip
        rcv = None
        try:
            cluster.run("tests.support.ddp_ops:publish_initial", timeout_s=120, version=0)
            raced: dict[int, Any] = {}  # version -> what runs after its last byte, before its re-check

            def after_wire(version: int) -> None:
                if version in raced:
                    raced.pop(version)()

            rcv = receiver(server.address, name, 0, torch.device("cuda", RECEIVER_GPU), on_after_wire=after_wire)
            assert rcv.cuda_ipc
            assert rcv.update_weights(version=0).version == 0
            assert differing_from_hf(rcv) == []
            # Copied by cudaMemcpyAsync (ipc_copies), or by kernels that digest as they copy (checked_copies).
            assert rcv.stats.ipc_copies + rcv.stats.checked_copies > 0, "no byte was copied over CUDA IPC"
            # (version, over CUDA IPC, pieces to un-interleave copied out of the mapped memory, digests)
            cases = ((1, True, True, True), (2, False, False, True), (3, True, False, True), (4, True, True, False))
            for version, ipc, mapped, verify in cases:
                ranks = cluster.run("tests.support.ddp_ops:step", timeout_s=300, version=version)
                rcv.cuda_ipc, rcv.mapped_install, rcv.verify_digests = ipc, mapped, verify
                stats = rcv.stats
                before, verified, mapped_chunks = stats.ipc_copies, stats.verified_bytes, stats.mapped_chunks
                checked = stats.checked_copies
                result = rcv.update_weights(version=version)
                assert result.version == version
                copied = rcv.stats.ipc_copies > before or rcv.stats.checked_copies > checked
                assert copied == ipc, (version, ipc, before, rcv.stats.ipc_copies)
                assert rcv.plan is not None and rcv.plan.pieces  # QKV staged (or copied out) to un-interleave
                # Copied out of the mapped memory only on the trainer's own GPU (0); from another, staged.
                copied_out = mapped and ipc and RECEIVER_GPU == 0
                assert (result.staging_bytes == 0) == copied_out, (version, result.staging_bytes)
                assert (rcv.stats.mapped_chunks > mapped_chunks) == copied_out
                assert (rcv.stats.verified_bytes > verified) == verify  # checked in place when copied out
                # The direct reads too, by kernels that digest them as they copy (with digests on).
                assert (rcv.stats.checked_copies > checked) == (copied_out and verify), version
                assert differing(rcv, [r["truth"] for r in ranks]) == [], f"v{version}: pulled bytes differ"

            _kill_a_reader_mid_pull(server.address, name, 4)
            cluster.run("tests.support.ddp_ops:step", timeout_s=300, version=5)  # waits for no one

            rcv.verify_digests = True  # the race over the mapped memory itself, kernels digesting and reading it
            stepped: list[Any] = []
            raced[5] = lambda: stepped.append(cluster.run("tests.support.ddp_ops:step", timeout_s=300, version=6))
            words = rcv.stats.shared_words
            with pytest.raises(VersionRetiredError, match="mixed"):
                rcv.update_weights(version=5)
            assert stepped and rcv.torn and rcv.stats.shared_words > words  # the retired word, read from the page
            assert rcv.update_weights().version == 6 and not rcv.torn
            assert differing(rcv, [r["truth"] for r in stepped[0]]) == [], "v6: pulled bytes differ"
            rcv.close()  # one receiver maps the trainer's memory at a time (as one engine rank would)
            rcv = None

            # Fetched ahead (as an engine does while it generates) through a small window: the first
            # chunks staged, the rest copied out of the mapped memory at install, every byte checked.
            gpu = torch.device("cuda", RECEIVER_GPU)
            with receiver(server.address, name, 6, gpu, max_staging_bytes=SMALL_WINDOW) as small:
                staged = small.fetch(6)
                result = small.install(staged)
                assert 0 < staged.pulled < result.chunks and small.stats.peak_staging_bytes <= SMALL_WINDOW
                assert small.stats.mapped_chunks == (result.chunks - staged.pulled if RECEIVER_GPU == 0 else 0)
                assert small.stats.unverified_bytes == 0 and small.stats.verified_bytes >= result.bytes
                assert (small.stats.checked_copies > 0) == (RECEIVER_GPU == 0)
                assert differing(small, [r["truth"] for r in stepped[0]]) == [], "v6 through a small window differs"
        finally:
            if rcv is not None:
                rcv.close()
            cluster.run("tests.support.ddp_ops:close", timeout_s=60)
