"""NixlAgent's life cycle on a real NIXL agent in this process: `close` ends the agent (and its UCX
progress thread) at once, is idempotent, and every later use is a TransportError."""

from __future__ import annotations

import gc
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from refit.errors import TransportError
from refit.transport.nixl import NixlAgent, ReadJob, ReadOp


def _thread_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def test_close_ends_the_nixl_agent_and_its_threads_while_the_object_lives_on() -> None:
    buf = torch.zeros(4096, dtype=torch.uint8)
    before = _thread_ids()
    agent = NixlAgent()
    agent.register(buf.data_ptr(), buf.numel())
    peer = NixlAgent()
    agent.connect(peer.name, peer.metadata())
    started = _thread_ids() - before
    assert started, "a NIXL agent with UCX starts threads (progress thread)"
    inner = weakref.ref(agent._agent)
    gc.disable()  # prove the release is deterministic, not the collector's doing
    try:
        agent.close()
        peer.close()
        assert inner() is None
        assert not started & _thread_ids(), "the agents' threads outlive close()"
    finally:
        gc.enable()
    assert agent.name  # the object itself is still there, only closed


def test_close_is_idempotent_and_later_use_is_a_transport_error() -> None:
    buf = torch.zeros(64, dtype=torch.uint8)
    agent = NixlAgent()
    agent.register(buf.data_ptr(), buf.numel())
    agent.close()
    agent.close()
    with agent:  # __exit__ closes once more
        pass
    assert agent.in_flight() == 0
    agent.deregister(buf.data_ptr(), buf.numel())  # nothing registered any more: a no-op
    with pytest.raises(TransportError, match="is closed"):
        agent.metadata()
    with pytest.raises(TransportError, match="is closed"):
        agent.register(buf.data_ptr(), buf.numel())
    with pytest.raises(TransportError, match="is closed"):
        agent.connect("someone", b"metadata")
    job = ReadJob(agent_name="someone", ops=[ReadOp(local_addr=buf.data_ptr(), remote_addr=0, nbytes=8)])
    with pytest.raises(TransportError, match="is closed"):
        agent.read([job], timeout_s=1.0)


def test_reads_posted_on_one_thread_land_on_another_in_order() -> None:
    # A streamed install posts all-at-once direct batches itself and lands them on a worker.
    with NixlAgent(prefix="post-a") as reader, NixlAgent(prefix="post-b") as source:
        src = torch.arange(1 << 16, dtype=torch.int64)
        dst = torch.full_like(src, -1)
        source.register(src.data_ptr(), src.numel() * 8)
        reader.register(dst.data_ptr(), dst.numel() * 8)
        reader.connect(source.name, source.metadata())
        quarter = src.numel() // 4

        def job(k: int) -> ReadJob:
            at = 8 * k * quarter
            op = ReadOp(local_addr=dst.data_ptr() + at, remote_addr=src.data_ptr() + at, nbytes=8 * quarter)
            return ReadJob(agent_name=source.name, ops=(op,))

        posted = reader.post([[job(0), job(1)], [job(2)], [job(3)]])
        landed: list[int] = []
        with ThreadPoolExecutor(1) as worker:
            assert worker.submit(reader.land, posted, timeout_s=30, landed=landed.append).result() == 4
        assert landed == [0, 1, 2] and torch.equal(dst, src) and reader.in_flight() == 0
        # A job naming an agent it does not know fails the post; nothing it posted stays in flight.
        stranger = ReadJob(agent_name="nobody", ops=(ReadOp(local_addr=dst.data_ptr(), remote_addr=0, nbytes=8),))
        with pytest.raises(TransportError, match="nobody"):
            reader.post([[job(0)], [stranger]])
        assert reader.in_flight() == 0
