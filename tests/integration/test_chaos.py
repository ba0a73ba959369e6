"""Chaos: trainer ranks and receivers killed (SIGKILL) or cut off (a network partition) mid-refit.

Real parts only: Megatron trainer ranks in their own processes (gloo, real NIXL), the gRPC catalog,
HF engines pulling through `Receiver`s, a receiver in a process of its own, and a real network
namespace joined by a veth pair. Trainer ranks hold short leases (`LEASE_S`), so the catalog learns
of a death within seconds. Every case checks the engine keeps its old weights (or heals), that the
error is clear, and that the next refit succeeds bit for bit.

A killed worker breaks its `TrainerCluster` (it can no longer run collective commands), so each
trainer-kill case starts its own small cluster and then a second one: the restarted trainer.
Where a source must stall mid-READ, the trainers' UCX uses TCP only (over shared memory the reader
copies the bytes itself, so a stopped source does not stall it).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from refit import Receiver
from refit.catalog.client import CatalogClient
from refit.engines import HFEngine
from refit.errors import SourceDeadError, VersionFailedError
from refit.types import VersionState
from refit_server import CatalogServer
from tests.support import hf_models as hm
from tests.support import netns
from tests.support.cluster import ClusterError, TrainerCluster
from tests.support.refit_harness import OPS, Trainer, assert_same_weights

CHAOS = "tests.support.chaos_ops"
LEASE_S = 1.5
HEARTBEAT_S = 0.3
LEASED = {"lease_s": LEASE_S, "heartbeat_s": HEARTBEAT_S}
SOURCE_TIMEOUT_S = 3.0  # a stalled source is given up after this; the update's deadline is longer
UPDATE_S = 60.0
WAIT_S = 30.0  # bound on waiting for the catalog to notice a lapsed lease (about LEASE_S)
# The partitioned rank's heartbeats cannot reach the catalog: its lease must outlast the partition, or
# the catalog lists it dead and receivers never try it (a loaded host also lapses short leases).
PARTITION_LEASED = {"lease_s": 30.0, "heartbeat_s": 1.0}


@contextlib.contextmanager
def cluster(world_size: int, *, tcp: bool = False, env: dict[str, str] | None = None) -> Iterator[TrainerCluster]:
    """Trainer processes of their own; with `tcp`, their NIXL agents reach peers over TCP only; `env`:
    more variables for the trainer processes alone."""
    extra = {**({"UCX_TLS": "tcp"} if tcp else {}), **(env or {})}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        trainers = TrainerCluster(world_size=world_size, timeout_s=300.0).start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield trainers
    finally:
        trainers.close()


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S:g}s")
        time.sleep(0.1)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"


def state(catalog: str, name: str, version: int) -> VersionState:
    with CatalogClient(catalog) as client:
        return client.version_state(name=name, version=version)


def agents(catalog: str, name: str, version: int) -> dict[int, str]:
    with CatalogClient(catalog) as client:
        return {s.rank: s.agent_name for s in client.get_sources(name=name, version=version)}


@contextlib.contextmanager
def restarted(
    catalog: str, tmp_path: Path, name: str, *, version: int, seed: int, world_size: int, tp: int
) -> Iterator[torch.nn.Module]:
    """A restarted trainer: new processes take the ranks over and publish `version` of `name`; yields
    the HF ground truth of that version while they serve it."""
    with cluster(world_size) as trainers:
        t = Trainer(trainers, catalog, tmp_path, hm.LLAMA_GQA, tp=tp, pp=1)
        weights = t.step(seed=seed)
        trainers.run(f"{OPS}:publish", key=t.name, name=name, catalog=catalog, version=version,
                     vocab_size=t.vocab, takeover=True, **LEASED)  # fmt: skip
        assert state(catalog, name, version) is VersionState.READY
        yield weights


def test_a_trainer_killed_mid_publish_fails_its_version_and_receivers_read_the_last(catalog: str, tmp_path) -> None:
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    with cluster(2) as trainers, CatalogClient(catalog) as client:
        t = Trainer(trainers, catalog, tmp_path, hm.LLAMA_GQA, tp=1, pp=1)  # two DP replicas
        t.publish(1, snapshots=2, **LEASED)  # snapshots: version 1 stays readable while 2 is published
        rcv = Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, direct=False)
        with rcv:
            assert rcv.update_weights().version == 1
            assert_same_weights(engine_model, t.hf)
            assert set(rcv.plan.bytes_by_rank) == {0, 1}  # both replicas serve it
            dying = agents(catalog, t.name, 1)[1]

            t.step(seed=2)
            assert trainers.run(f"{CHAOS}:publish_and_die", name=t.name, version=2, ranks=[1]) == ["STAGING", "dying"]
            trainers.wait_dead(1)
            wait_for(lambda: client.version_state(name=t.name, version=2) is VersionState.FAILED, "v2 FAILED")
            v2 = client.get_version(name=t.name, version=2)
            assert v2.failure == f"rank 1 (agent '{dying}') lost its lease" and v2.published_ranks == (0,)
            v1 = client.get_version(name=t.name, version=1)
            assert v1.state is VersionState.READY and v1.dead_ranks == (1,)

            # Receivers are unaffected: version 1 is still the newest READY one, read from rank 0 alone.
            fresh = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
            with Receiver(catalog=catalog, engine=HFEngine(fresh), name=t.name, direct=False) as other:
                assert other.update_weights(timeout_s=UPDATE_S).version == 1
                assert set(other.plan.bytes_by_rank) == {0} and other.failed_over == ()
            assert_same_weights(fresh, t.hf)
            before = snapshot(engine_model)
            with pytest.raises(VersionFailedError, match=f"rank 1 \\(agent '{dying}'\\) lost its lease"):
                rcv.update_weights(version=2, timeout_s=UPDATE_S)
            assert_unchanged(engine_model, before)

            # The next refit: the trainer restarts (new processes), takes its ranks over, publishes anew.
            trainers.close()
            with restarted(catalog, tmp_path, t.name, version=3, seed=3, world_size=2, tp=1) as v3:
                assert rcv.update_weights(timeout_s=UPDATE_S).version == 3
            assert_same_weights(engine_model, v3)


@contextlib.contextmanager
def pulling(rcv: Receiver, **kwargs: object) -> Iterator[Future]:
    """`rcv.update_weights(**kwargs)` running on a thread of its own."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(rcv.update_weights, **kwargs)


def test_a_trainer_killed_mid_pull_fails_over_to_its_replica_or_names_the_rank(catalog: str, tmp_path) -> None:
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    with cluster(4, tcp=True) as trainers:
        t = Trainer(trainers, catalog, tmp_path, hm.LLAMA_GQA, tp=2, pp=1)  # TP2 x DP2: ranks 1 and 3 are replicas
        t.publish(1, **LEASED)
        held = agents(catalog, t.name, 1)
        rcv = Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, direct=False,
                       source_timeout_s=SOURCE_TIMEOUT_S)  # fmt: skip
        with rcv:
            assert rcv.update_weights().version == 1
            assert set(rcv.plan.bytes_by_rank) == {0, 1, 2, 3}  # striped over both replicas

            # Rank 1 is stopped (its READs stall, over TCP), a pull starts, and rank 1 is killed. This
            # receiver streams (direct reads into the engine, chunks through a small window): it fails
            # over once no READ of the failed attempt can still land, and ends whole, not torn.
            fresh = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
            other = Receiver(catalog=catalog, engine=HFEngine(fresh), name=t.name, max_staging_bytes=64 << 10,
                             direct_min_bytes=0, source_timeout_s=SOURCE_TIMEOUT_S)  # fmt: skip
            with other:
                trainers.kill(1, signal.SIGSTOP)
                with pulling(other, version=1, timeout_s=UPDATE_S) as pull:
                    time.sleep(0.5)  # the pull is under way (if not, it meets a dead rank: the same failover)
                    trainers.kill(1)
                    result = pull.result()
                assert result.version == 1
                assert other.failed_over == (held[1],) and not other.torn and result.direct_bytes > 0
                assert set(other.plan.bytes_by_rank) == {0, 2, 3}  # shard 1 from rank 3 alone
            assert_same_weights(fresh, t.hf)

            # Without a replica: rank 3, the other holder of TP shard 1, dies too.
            trainers.kill(3)
            trainers.wait_dead(3)
            before = snapshot(engine_model)
            with pytest.raises(SourceDeadError, match="no live replica") as err:
                rcv.update_weights(version=1, timeout_s=UPDATE_S)
            assert (
                3 in err.value.ranks and held[3] in err.value.agents and f"rank 3 (agent '{held[3]}')" in str(err.value)
            )
            assert_unchanged(engine_model, before)

            trainers.close()
            with restarted(catalog, tmp_path, t.name, version=2, seed=2, world_size=2, tp=2) as v2:
                assert rcv.update_weights(timeout_s=UPDATE_S).version == 2
            assert_same_weights(engine_model, v2)


@pytest.fixture(scope="module")
def tcp_pair() -> Iterator[TrainerCluster]:
    with cluster(2, tcp=True) as trainers:
        yield trainers


def lines(proc: subprocess.Popen) -> queue.Queue:
    """The process's stdout lines, on a queue filled by a daemon thread."""
    out: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            out.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return out


def expect(out: queue.Queue, want: str) -> None:
    deadline = time.monotonic() + 120.0
    while time.monotonic() < deadline:
        try:
            if out.get(timeout=1.0) == want:
                return
        except queue.Empty:
            continue
    raise AssertionError(f"the receiver never printed {want!r}")


@contextlib.contextmanager
def stopped(trainers: TrainerCluster) -> Iterator[None]:
    for rank in range(trainers.world_size):
        trainers.kill(rank, signal.SIGSTOP)
    try:
        yield
    finally:
        for rank in range(trainers.world_size):
            trainers.kill(rank, signal.SIGCONT)


def kill_a_receiver_mid_pull(trainers: TrainerCluster, catalog: str, tmp_path: Path, *, stall: bool) -> None:
    """A receiver process pulls in a loop and is SIGKILLed mid-pull (with `stall`, while the trainers
    are stopped, so its READ is certainly in flight); then the trainer steps and publishes the next
    version, and a new receiver refits it."""
    t = Trainer(trainers, catalog, tmp_path, hm.LLAMA_GQA, tp=2, pp=1)
    try:
        t.publish(1)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        command = [sys.executable, "-m", "tests.support.chaos_receiver", catalog, t.name, hm.LLAMA_GQA.id, "1"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        try:
            out = lines(proc)
            expect(out, "done")  # it refits
            with stopped(trainers) if stall else contextlib.nullcontext():
                expect(out, "pulling")
                time.sleep(0.5)  # it pulls in a loop: the kill lands inside a pull
                proc.kill()
                assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with CatalogClient(catalog) as client:
            info = client.get_version(name=t.name, version=1)
        assert info.state is VersionState.READY and info.dead_ranks == () and info.failure == ""
        # The trainer goes on: a step and the next version; a new receiver refits it.
        v2 = t.step(seed=2)
        trainers.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        assert state(catalog, t.name, 2) is VersionState.READY
        engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
        with Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name) as rcv:
            assert rcv.update_weights(timeout_s=UPDATE_S).version == 2
        assert_same_weights(engine_model, v2)
    finally:
        if trainers.alive(0):
            t.close()


def test_a_receiver_killed_mid_pull_leaves_trainer_and_catalog_unaffected(
    tcp_pair: TrainerCluster, catalog: str, tmp_path
) -> None:
    kill_a_receiver_mid_pull(tcp_pair, catalog, tmp_path, stall=False)


def test_a_receiver_killed_while_its_read_is_queued_at_a_stalled_trainer(catalog: str, tmp_path) -> None:
    """The trainers are stopped, so the receiver's READ is in flight and the trainers' replies queue
    when it dies; resumed, they carry on (with refit's UCX default `UCX_KEEPALIVE_INTERVAL=inf`)."""
    with cluster(2, tcp=True) as trainers:
        kill_a_receiver_mid_pull(trainers, catalog, tmp_path, stall=True)


@pytest.mark.soak
@pytest.mark.xfail(
    strict=True,
    raises=ClusterError,
    reason="UCX (NIXL 1.5.1's, over TCP) with its keepalive on aborts the trainer process ('ucp_request.inl:356 "
    "Fatal: unexpected error: Endpoint timeout') when a receiver dies while the trainer's replies to its READ "
    "are queued",
)
def test_with_ucx_keepalive_a_receiver_killed_while_its_read_is_queued_aborts_the_trainer(
    catalog: str, tmp_path
) -> None:
    """UCX's own default (keepalive every 20 s) in the trainers: the abort refit's default avoids. Kept so
    that a UCX/NIXL fix shows up (this then passes, and the strict xfail fails)."""
    with cluster(2, tcp=True, env={"UCX_KEEPALIVE_INTERVAL": "20s"}) as trainers:
        kill_a_receiver_mid_pull(trainers, catalog, tmp_path, stall=True)


@pytest.mark.skipif(netns.available() is not None, reason=f"no network namespaces: {netns.available()}")
def test_a_partition_between_receiver_and_a_source_times_out_and_fails_over(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 lives in a network namespace of its own; cutting the veth link between it and the
    receiver stalls the receiver's READ (no reset, as in a real partition), which gives the source up
    after `source_timeout_s` and reads its bytes from rank 0, the DP replica. A receiver that first
    meets rank 1 during the partition (its connect goes unanswered) fails over the same way, within
    its update's deadline when its UCX connects without blocking (`UCX_TCP_CONN_NB=y`, set for it here:
    not refit's default, see docs/reliability.md), so no connect holds NIXL for the kernel's SYN
    timeout (~130 s)."""
    with (
        netns.netns() as ns,
        CatalogServer(store="memory", host="0.0.0.0", port=0).start() as server,
        cluster(2, tcp=True) as trainers,
    ):
        catalog = f"{ns.host_addr}:{server.address.rsplit(':', 1)[1]}"  # reachable from both namespaces
        t = Trainer(trainers, catalog, tmp_path, hm.LLAMA_GQA, tp=1, pp=1)
        # After the model (its gloo groups connect over this namespace's loopback), before the
        # publisher (its NIXL agent and catalog channel are made in the new namespace).
        assert trainers.run(f"{CHAOS}:enter_netns", path=ns.path, ranks=[1]) == [False, True]
        t.publish(1, **PARTITION_LEASED)
        held = agents(catalog, t.name, 1)
        engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
        rcv = Receiver(catalog=catalog, engine=HFEngine(engine_model), name=t.name, direct=False,
                       source_timeout_s=SOURCE_TIMEOUT_S)  # fmt: skip
        with rcv:
            assert rcv.update_weights(timeout_s=UPDATE_S).version == 1  # UCX over TCP across the namespaces
            assert set(rcv.plan.bytes_by_rank) == {0, 1}

            fresh = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
            with Receiver(catalog=catalog, engine=HFEngine(fresh), name=t.name, direct=False,
                          source_timeout_s=SOURCE_TIMEOUT_S) as other:  # fmt: skip
                other.update_weights(timeout_s=UPDATE_S)  # connected to both ranks before the cut
                late_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
                monkeypatch.setenv("UCX_TCP_CONN_NB", "y")  # read when its NIXL agent is made
                late = Receiver(catalog=catalog, engine=HFEngine(late_model), name=t.name, direct=False,
                                source_timeout_s=SOURCE_TIMEOUT_S)  # fmt: skip
                ns.partition()
                try:
                    result = other.update_weights(version=1, timeout_s=UPDATE_S)
                    with late, pulling(late, version=1, timeout_s=UPDATE_S) as pull:
                        # The update's own deadline bounds it; a blocking connect would outlast it.
                        late_result = pull.result(timeout=UPDATE_S)
                finally:
                    ns.heal()
                assert result.version == 1 and other.plan.bytes_by_rank.keys() == {0}
                assert other.failed_over == (held[1],)
                assert late_result.version == 1 and late.plan.bytes_by_rank.keys() == {0}
                assert late.failed_over == (held[1],)
            assert_same_weights(fresh, t.hf)
            assert_same_weights(late_model, t.hf)

            # Healed: once both ranks reach the catalog again, the trainer steps and publishes the next
            # version (rank 1 claims again first if its lease lapsed meanwhile); the receiver refits it.
            trainers.run(f"{CHAOS}:wait_renewed", name=t.name, within_s=WAIT_S)
            v2 = t.step(seed=2)
            trainers.run(f"{OPS}:invalidate", name=t.name)
            t.publish(2)
            assert state(catalog, t.name, 2) is VersionState.READY
            assert rcv.update_weights(timeout_s=UPDATE_S).version == 2
            assert_same_weights(engine_model, v2)
