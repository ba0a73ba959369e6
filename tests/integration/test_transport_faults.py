"""A failed or timed-out NIXL READ never writes into a later refit's staging buffer.

Real parts: a one-rank Megatron trainer (its own process, real NIXL) whose UCX reaches peers over TCP
only, the module's gRPC catalog, and an `HFEngine` pulling through a `Receiver` in this process.
Over shared memory the reader copies the bytes itself and a READ ends while it is posted; over TCP
the trainer's progress thread serves it, so stopping the trainer (SIGSTOP) keeps a READ in flight
past its deadline. Releasing the handle of such a READ does not stop it: once the trainer resumes,
its bytes still land. The receiver must therefore set that staging buffer aside (and free it only
once the READ has ended) and pull the next version into a fresh one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Iterator

import pytest
import torch

from refit import Receiver
from refit.catalog.client import CatalogClient
from refit.config import DEFAULT_TIMEOUTS
from refit.engines import HFEngine
from refit.errors import TransferTimeoutError, TransportError
from tests.support import hf_models as hm
from tests.support.cluster import TrainerCluster
from tests.support.refit_harness import OPS, Trainer, assert_same_weights

READ_DEADLINE_S = 3.0  # the stopped trainer never answers, so any deadline passes
SETTLE_S = 30.0  # bound on waiting for the abandoned READ to end once the trainer resumes


@pytest.fixture(scope="module")
def tcp_trainers() -> Iterator[TrainerCluster]:
    """One trainer process whose NIXL agent (UCX) uses TCP only; it inherits the variable at spawn."""
    saved = os.environ.get("UCX_TLS")
    os.environ["UCX_TLS"] = "tcp"
    try:
        cluster = TrainerCluster(world_size=1, timeout_s=300.0).start()
    finally:
        if saved is None:
            os.environ.pop("UCX_TLS", None)
        else:
            os.environ["UCX_TLS"] = saved
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def tcp_trainer(tcp_trainers: TrainerCluster, catalog: str, tmp_path) -> Iterator[Trainer]:
    t = Trainer(tcp_trainers, catalog, tmp_path, hm.LLAMA_GQA, tp=1, pp=1)
    yield t
    t.close()


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """The trainer processes are stopped (their NIXL progress threads too) inside the block."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"


def test_a_timed_out_read_never_lands_in_the_next_refits_staging(tcp_trainer: Trainer, catalog: str) -> None:
    t = tcp_trainer
    t.publish(1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    # Staged whole (no direct reads): the engine keeps its weights, the staging buffer is set aside.
    with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, direct=False) as rcv:
        rcv.update_weights(version=1)
        assert_same_weights(engine_model, t.hf)
        first = rcv.stats
        assert (first.registrations, first.quarantined, first.quarantined_bytes) == (1, 0, 0)

        before = snapshot(engine_model)
        with stopped(t.cluster.pids), pytest.raises(TransferTimeoutError):
            rcv.update_weights(version=1, timeout_s=READ_DEADLINE_S)
        held = rcv.stats
        # The READ is still in flight into the old buffer: set aside, not freed and not reused.
        assert (held.quarantined, held.staging_bytes, held.quarantined_bytes) == (1, 0, first.staging_bytes)
        assert_unchanged(engine_model, before)

        # The trainer resumed: the abandoned READ completes into the set-aside buffer while the
        # trainer steps and publishes the next version, which arrives in a fresh buffer, whole.
        v2 = t.step(seed=2)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        assert rcv.update_weights().version == 2
        assert_same_weights(engine_model, v2)
        after = rcv.stats
        assert after.registrations == first.registrations + 1, "staging was reused after a failed read"
        assert (after.staging_bytes, after.quarantined) == (first.staging_bytes, 1)

        # Once the abandoned READ has ended, the set-aside buffer is freed by the next fetch.
        deadline = time.monotonic() + SETTLE_S
        while rcv.stats.quarantined_bytes and time.monotonic() < deadline:
            time.sleep(DEFAULT_TIMEOUTS.poll_s)
            rcv.fetch()
        assert rcv.stats.quarantined_bytes == 0
        assert rcv.stats.registrations == after.registrations  # and the fresh buffer is reused from now on


def test_a_failed_read_is_followed_by_a_bit_exact_refit(tcp_trainer: Trainer, catalog: str) -> None:
    """A version whose regions NIXL refuses (addresses the trainer never registered) fails the pull;
    the next good version is installed whole from a fresh staging buffer."""
    t = tcp_trainer
    t.publish(1)
    mirror = t.name + "-mirror"  # the same trainer memory, published by the test under a second name
    with CatalogClient(catalog) as client:
        info = client.get_version(name=t.name, version=1)
        sources = client.get_sources(name=t.name, version=1)

        def publish(version: int, *, shift: int = 0) -> None:
            for s in sources:
                regions = tuple(dataclasses.replace(g, addr=g.addr + shift) for g in s.regions)
                # Not the trainer's version word: it holds the trainer's own version numbers.
                source = dataclasses.replace(s, regions=regions, fence_addr=0)
                client.publish(
                    name=mirror, version=version, world_size=info.world_size, model=info.model, source=source
                )

        publish(1, shift=1 << 44)
        engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
        before = snapshot(engine_model)
        with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=mirror, direct=False) as rcv:
            with pytest.raises(TransportError, match="could not start"):
                rcv.update_weights(version=1)
            assert_unchanged(engine_model, before)
            failed = rcv.stats
            # Nothing was left in flight, so the set-aside buffer is freed at once.
            assert (failed.registrations, failed.quarantined, failed.quarantined_bytes) == (1, 1, 0)
            assert failed.staging_bytes == 0

            publish(2)
            assert rcv.update_weights().version == 2
            assert_same_weights(engine_model, t.hf)
            assert rcv.stats.registrations == 2 and rcv.stats.staging_bytes > 0


def test_a_streamed_install_that_times_out_leaves_the_engine_torn_until_a_refit_completes(
    tcp_trainer: Trainer, catalog: str
) -> None:
    """Streamed refits write engine memory as they go (direct reads, chunk installs): a READ that
    stalls mid-install cannot leave the old weights, so the receiver says the engine is torn, and
    the next refit waits for the abandoned READ to end before it writes the engine again."""
    t = tcp_trainer
    t.publish(1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    window = 64 << 10
    with Receiver(
        catalog=catalog, engine=HFEngine(engine_model), name=t.name, max_staging_bytes=window, direct_min_bytes=0
    ) as rcv:
        staged = rcv.fetch(version=1)  # planned (and staged chunks prefetched) while the engine would serve
        assert staged.streamed  # TP1 -> TP1: every tensor is read straight into the engine, in install
        with stopped(t.cluster.pids), pytest.raises(TransferTimeoutError):
            rcv.install(staged, timeout_s=READ_DEADLINE_S)
        assert rcv.torn

        v2 = t.step(seed=2)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        result = rcv.update_weights(timeout_s=SETTLE_S)
        assert result.version == 2 and result.direct_bytes > 0
        assert not rcv.torn
        assert_same_weights(engine_model, v2)
        assert rcv.stats.peak_staging_bytes <= window
