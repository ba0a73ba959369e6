"""The refit backend's TP agreement (`agree_and_install`) across ranks, with an in-process all-gather.

Each TP rank runs in its own thread; `gather` is a real all-gather among those threads (a barrier with
a deadline, so a rank that skipped an agreement shows as a broken barrier, not a hang). The real
all-gather over vLLM's TP group runs in tests/integration/test_vllm_backend.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("vllm")

from refit.errors import EngineError, ModelMismatchError, RankVersionMismatchError, TransferTimeoutError
from refit.receiver import StagedVersion
from refit.types import UpdateResult
from refit.vllm import flow
from refit.vllm.backend import RefitInitInfo, RefitUpdateInfo, agree_and_install

TP = 3


class ThreadGather:
    """An all-gather of one int among `size` threads: every rank gets every rank's value, in rank order."""

    def __init__(self, size: int) -> None:
        self.values: list[int | None] = [None] * size
        self.barrier = threading.Barrier(size, timeout=30)
        self.rounds = [0] * size

    def for_rank(self, rank: int) -> Callable[[int], list[int]]:
        def gather(value: int) -> list[int]:
            self.values[rank] = value
            self.barrier.wait()  # everyone has written
            out = [int(v) for v in self.values if v is not None]
            self.barrier.wait()  # everyone has read before the next round writes
            self.rounds[rank] += 1
            return out

        return gather


class Rank:
    """One rank's stage and install, failing as told; records what it did."""

    def __init__(self, version: int, *, stage_error: Exception | None = None, install_error: Exception | None = None):
        self.version, self.stage_error, self.install_error = version, stage_error, install_error
        self.staged = self.installed = 0

    def stage(self) -> StagedVersion:
        self.staged += 1
        if self.stage_error is not None:
            raise self.stage_error
        return StagedVersion(version=self.version, tensors={}, bytes=10, num_sources=1, num_descriptors=1)

    def install(self, staged: StagedVersion) -> UpdateResult:
        if self.install_error is not None:
            raise self.install_error
        self.installed += 1
        return UpdateResult(version=staged.version, bytes=staged.bytes, seconds=0.0)


def _agree(asked: list[int], ranks: list[Rank]) -> tuple[list[Any], ThreadGather]:
    """Run every rank's agreement at once; per rank, its UpdateResult or the exception it raised."""
    gather = ThreadGather(len(ranks))
    outcomes: list[Any] = [None] * len(ranks)

    def one(rank: int) -> None:
        try:
            outcomes[rank] = agree_and_install(
                asked[rank], stage=ranks[rank].stage, install=ranks[rank].install, gather=gather.for_rank(rank)
            )
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcomes[rank] = exc

    threads = [threading.Thread(target=one, args=(r,)) for r in range(len(ranks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank is stuck in an agreement"
    assert not any(isinstance(o, threading.BrokenBarrierError) for o in outcomes), outcomes
    return outcomes, gather


def test_every_rank_installs_the_agreed_version() -> None:
    ranks = [Rank(5) for _ in range(TP)]
    outcomes, gather = _agree([5] * TP, ranks)
    assert [o.version for o in outcomes] == [5] * TP
    assert [r.installed for r in ranks] == [1] * TP and gather.rounds == [3] * TP


def test_ranks_asked_for_different_versions_pull_and_install_nothing() -> None:
    ranks = [Rank(5), Rank(5), Rank(6)]
    outcomes, gather = _agree([5, 5, 6], ranks)
    for o in outcomes:
        assert isinstance(o, RankVersionMismatchError) and "versions [5, 5, 6]" in str(o)
    assert [r.staged for r in ranks] == [0] * TP and [r.installed for r in ranks] == [0] * TP
    assert gather.rounds == [1] * TP


def test_a_rank_that_cannot_stage_stops_every_install() -> None:
    late = TransferTimeoutError("READ of rank 1's shards timed out")
    ranks = [Rank(5), Rank(5, stage_error=late), Rank(5)]
    outcomes, gather = _agree([5] * TP, ranks)
    assert outcomes[1] is late  # the failing rank raises its own error
    for rank in (0, 2):
        assert type(outcomes[rank]) is EngineError and "TP ranks [1] could not stage v5" in str(outcomes[rank])
    assert [r.installed for r in ranks] == [0] * TP and gather.rounds == [2] * TP


def test_a_rank_that_staged_another_version_stops_every_install() -> None:
    ranks = [Rank(5), Rank(5), Rank(4)]  # rank 2's staging holds an older version
    outcomes, _ = _agree([5] * TP, ranks)
    assert all(type(o) is EngineError and "TP ranks [2] could not stage v5" in str(o) for o in outcomes)
    assert [r.installed for r in ranks] == [0] * TP


def test_a_rank_that_fails_to_install_fails_the_update_on_every_rank() -> None:
    refused = ModelMismatchError("layer 0: shape differs")
    ranks = [Rank(5), Rank(5), Rank(5, install_error=refused)]
    outcomes, gather = _agree([5] * TP, ranks)
    assert outcomes[2] is refused
    for rank in (0, 1):
        assert type(outcomes[rank]) is EngineError and "TP ranks [2] failed to install v5" in str(outcomes[rank])
    assert gather.rounds == [3] * TP


def test_a_programming_error_keeps_its_class_on_the_rank_that_hit_it() -> None:
    bug = TypeError("install() missing 1 required positional argument")
    ranks = [Rank(5, install_error=bug), Rank(5), Rank(5)]
    outcomes, _ = _agree([5] * TP, ranks)
    assert outcomes[0] is bug and all(type(o) is EngineError for o in outcomes[1:])


def test_the_drivers_init_info_is_what_the_backend_accepts() -> None:
    info = RefitInitInfo(**flow.init_info(catalog="c:1", name="n", replica=1, timeout_s=9.0, catalog_timeout_s=3.0))
    assert info.catalog_timeout_s == 3.0 and info.timeout_s == 9.0 and info.replica == 1
    assert RefitUpdateInfo(version=7).version == 7


def test_reserve_fds_grows_the_fd_table_once_and_closes_nothing() -> None:
    # Growing it later, inside UCX's accept on a first pull, waited for an RCU grace period that a
    # busy 2-core machine did not give for minutes (refit.vllm.backend.reserve_fds).
    import os
    import resource

    from refit.vllm.backend import reserve_fds

    def fd_size() -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("FDSize:")).split()[1])

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    before = sorted(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    try:
        reserve_fds(2048)
        assert fd_size() >= min(2048, soft)
        assert os.write(w, b"x") == 1 and os.read(r, 1) == b"x"  # open fds untouched
        reserve_fds(2048)  # again: nothing to do
    finally:
        os.close(r)
        os.close(w)
    assert sorted(os.listdir("/proc/self/fd")) == before
