"""NixlAgent's life cycle on a real NIXL agent in this process: `close` ends the agent (and its UCX
progress thread) at once, is idempotent, and every later use is a TransportError."""

from __future__ import annotations

import gc
import os
import weakref

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
