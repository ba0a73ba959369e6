"""Reads of trainer ranks on the receiver's own host: version words from a shared page
(`refit.transport.host`) and the CPU side of copies over CUDA IPC (`refit.transport.cuda_ipc`).

The shared page is real (/dev/shm, two mappings of it). The copies themselves need a GPU
(tests/gpu/test_cuda_ipc.py); here, what decides them: which ranks are copied here, how a job's ranges
become copies out of the mapped regions, and the checks on published handles.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from refit.catalog import wire
from refit.errors import ConfigError, TransportError
from refit.transport import cuda_ipc
from refit.transport.host import PAGE_BYTES, SharedWords, WordReader, host_id, remove_orphans, valid_shm_name
from refit.transport.jobs import ReadJob, ReadOp
from refit.types import IPC_HANDLE_BYTES, WORD_RETIRED, Region
from tests.support import catalog_samples as samples

HANDLE = bytes(range(IPC_HANDLE_BYTES))


def test_a_word_written_by_the_trainer_is_read_from_the_shared_page() -> None:
    words = SharedWords(3)
    reader = WordReader()
    try:
        assert valid_shm_name(words.name)
        words.words.fill_(WORD_RETIRED)
        addr = words.words.data_ptr() + 8 * 2
        assert addr % PAGE_BYTES == 16  # the page is page-aligned: the offset is the address modulo the page
        assert reader.can_read(host_id(), words.name)
        assert reader.read(words.name, addr) == WORD_RETIRED
        words.words[2] = 41
        words.words[1] = 7
        assert reader.read(words.name, addr) == 41  # each read is a load now, not a copy taken once
        assert reader.read(words.name, addr - 8) == 7
        assert reader.reads == 3
    finally:
        words.close()
    assert not os.path.exists(f"/dev/shm/{words.name}")  # unlinked; the reader's mapping stays valid
    assert reader.read(words.name, addr) == 41
    reader.close()


def test_pages_of_ranks_no_longer_sources_are_unmapped() -> None:
    kept, gone = SharedWords(1), SharedWords(1)
    reader = WordReader()
    try:
        assert reader.can_read(host_id(), kept.name) and reader.can_read(host_id(), gone.name)
        assert not reader.can_read(host_id(), "../refused")
        reader.retain({kept.name})  # a version whose sources no longer name `gone`
        assert reader.read(kept.name, kept.words.data_ptr()) == int(kept.words[0])
        with pytest.raises(KeyError):
            reader.read(gone.name, gone.words.data_ptr())  # unmapped: never read again from here
        assert reader.can_read(host_id(), gone.name)  # a version naming it again maps it again
        assert "../refused" not in reader._refused  # forgotten with its rank
    finally:
        reader.close()
        kept.close()
        gone.close()


@pytest.mark.parametrize(
    "name",
    ["", "../../etc/passwd", "refit-words-xyz", "refit-words-" + "0" * 31, "refit-words-" + "0" * 32 + "/x"],
)
def test_names_a_trainer_would_not_make_are_never_opened(name: str) -> None:
    reader = WordReader()
    assert not reader.can_read(host_id(), name)


def test_another_host_or_a_missing_page_falls_back_to_nixl(caplog: pytest.LogCaptureFixture) -> None:
    reader = WordReader()
    words = SharedWords(1)
    try:
        assert not reader.can_read("boot:another-host", words.name)
    finally:
        words.close()
    assert not reader.can_read(host_id(), words.name)  # gone before this reader mapped it
    assert "reading them over NIXL" in caplog.text
    caplog.clear()
    assert not reader.can_read(host_id(), words.name)  # refused once, not tried (nor logged) again
    assert caplog.text == ""


_OWNER = """
import os, sys
from refit.transport.host import SharedWords
words = SharedWords(2)
words.words[0] = 5
print(words.name, flush=True)
if sys.argv[1] == "killed":
    os._exit(0)  # gone without close(): the page stays in /dev/shm
sys.stdin.read()  # alive (holding its page) until the test closes stdin
words.close()
"""


def _owner(mode: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_the_page_of_a_killed_trainer_is_removed_and_a_live_ones_kept() -> None:
    dead, dead_name = _owner("killed")
    assert dead.wait(timeout=60) == 0
    assert os.path.exists(f"/dev/shm/{dead_name}")
    live, live_name = _owner("alive")  # the next owner on this host sweeps
    try:
        assert not os.path.exists(f"/dev/shm/{dead_name}") and os.path.exists(f"/dev/shm/{live_name}")
        reader = WordReader()
        assert reader.can_read(host_id(), live_name)  # a reader's mapping takes no lock: it keeps nothing alive
        words = SharedWords(1)
        try:
            assert os.path.exists(f"/dev/shm/{live_name}")  # its owner lives: kept
            assert remove_orphans() == 0  # this page is locked by its owner too
        finally:
            words.close()
        assert reader.read(live_name, 0) == 5
        reader.close()
    finally:
        live.communicate("", timeout=60)
    assert live.returncode == 0 and not os.path.exists(f"/dev/shm/{live_name}")


def test_a_fifo_or_link_under_a_pages_name_blocks_nothing_and_is_never_read() -> None:
    fifo = f"/dev/shm/refit-words-{'f' * 32}"
    link = f"/dev/shm/refit-words-{'e' * 32}"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    os.symlink("/etc/hostname", link)
    try:
        assert remove_orphans() == 0  # neither is a page: left alone, and nothing blocked
        reader = WordReader()
        assert not reader.can_read(host_id(), os.path.basename(fifo))
        assert not reader.can_read(host_id(), os.path.basename(link))
        SharedWords(1).close()  # a new owner's sweep passes them by too
    finally:
        os.unlink(fifo)
        os.unlink(link)


def test_too_many_words_for_one_page_are_refused() -> None:
    with pytest.raises(ConfigError, match="page"):
        SharedWords(PAGE_BYTES // 8 + 1)


def test_a_region_carries_its_handle_only_on_a_gpu_and_only_whole() -> None:
    Region(index=0, addr=4096, nbytes=8, device="cuda", ipc_handle=HANDLE, ipc_offset=512)
    with pytest.raises(ConfigError, match="64 bytes"):
        Region(index=0, addr=4096, nbytes=8, device="cuda", ipc_handle=HANDLE[:-1])
    with pytest.raises(ConfigError, match="64 bytes"):
        Region(index=0, addr=4096, nbytes=8, device="cpu", ipc_handle=HANDLE)
    with pytest.raises(ConfigError, match="without an ipc_handle"):
        Region(index=0, addr=4096, nbytes=8, device="cuda", ipc_offset=8)


def test_handles_host_and_shared_page_survive_the_wire() -> None:
    s = samples.source(0)
    gpu = tuple(dataclasses.replace(r, device="cuda", ipc_handle=HANDLE, ipc_offset=4096 * r.index) for r in s.regions)
    s = dataclasses.replace(s, regions=gpu, host=host_id(), fence_shm="refit-words-" + "a" * 32, fence_addr=8)
    assert wire.source_from_proto(wire.source_to_proto(s)) == s


def test_an_oversized_handle_or_host_from_the_wire_is_refused() -> None:
    msg = wire.source_to_proto(samples.source(0))
    msg.regions[0].device = "cuda"
    msg.regions[0].ipc_handle = HANDLE + b"x"
    with pytest.raises(ConfigError, match="ipc_handle"):
        wire.source_from_proto(msg)
    msg = wire.source_to_proto(samples.source(0))
    msg.host = "h" * 65
    with pytest.raises(ConfigError, match="host"):
        wire.source_from_proto(msg)


def _gpu_source(host: str, *, handle: bytes = HANDLE, device: str = "cuda"):
    s = samples.source(0)
    regions = tuple(
        dataclasses.replace(r, device=device, ipc_handle=handle if device == "cuda" else b"") for r in s.regions
    )
    return dataclasses.replace(s, regions=regions, host=host)


def test_only_gpu_ranks_of_this_host_with_every_handle_are_copied_here(caplog: pytest.LogCaptureFixture) -> None:
    peers = cuda_ipc.LocalPeers(device=0)
    here = _gpu_source(peers.host)
    assert peers.covers([here])
    assert not peers.covers([])
    for other in (_gpu_source("boot:elsewhere"), _gpu_source(peers.host, handle=b""),
                  _gpu_source(peers.host, device="cpu")):  # fmt: skip
        assert not peers.covers([here, other])
        assert not peers.add(other)  # decided before any CUDA call: none is made on this machine
    fresh = cuda_ipc.LocalPeers(device=0)
    with caplog.at_level("INFO"):
        for _ in range(2):
            assert not fresh.add(_gpu_source(fresh.host, handle=b""))
    assert caplog.text.count("carry no CUDA IPC handle") == 1  # said once while its regions stay the same
    peers.enabled = False
    assert not peers.covers([here])
    job = ReadJob(agent_name=here.agent_name, ops=(), local_device="cuda", remote_device="cuda")
    assert not peers.owns(job)  # disabled, and never mapped


def test_ranks_that_are_no_longer_sources_are_unmapped(caplog: pytest.LogCaptureFixture) -> None:
    peers = cuda_ipc.LocalPeers(device=0)
    here = _gpu_source(peers.host)
    # A peer as `add` keeps it, without its mapping (no GPU here), and one `add` could not map.
    peers._peers["gone"] = peers._peers["kept"] = cuda_ipc._Peer(regions=here.regions, local={}, handles=())
    assert not peers.add(here)  # no CUDA runtime on this machine: refused, and remembered
    assert here.agent_name in peers._refused
    job = ReadJob(agent_name="gone", ops=(), local_device="cuda", remote_device="cuda")
    assert peers.owns(job)
    with caplog.at_level("INFO"):
        peers.retain({"kept"})  # a version whose sources no longer name "gone", nor the refused rank
    assert not peers.owns(job) and peers.owns(dataclasses.replace(job, agent_name="kept"))
    assert "gone: no longer a source" in caplog.text
    assert here.agent_name not in peers._refused  # tried again if it comes back


def test_a_jobs_ranges_become_copies_out_of_the_mapped_regions() -> None:
    regions = (
        Region(index=0, addr=0x10000, nbytes=0x1000, device="cuda", ipc_handle=HANDLE, ipc_offset=0x200),
        Region(index=1, addr=0x90000, nbytes=0x1000, device="cuda", ipc_handle=HANDLE, ipc_offset=0x2000),
    )
    peer = cuda_ipc._Peer(regions=regions, local={0: 0x7000_0200, 1: 0x7000_2000}, handles=(HANDLE,))
    ops = (
        ReadOp(local_addr=0x500, remote_addr=0x10100, nbytes=0x40, region=0),
        ReadOp(local_addr=0x540, remote_addr=0x10140, nbytes=0x20, region=0),  # touches the one above: merged
        ReadOp(local_addr=0x900, remote_addr=0x90010, nbytes=0x10, region=1),
        # Strided: 4 rows of 0x8 bytes, 0x100 apart in the trainer, packed here: one 2-D copy.
        ReadOp(
            local_addr=0xA00, remote_addr=0x90400, nbytes=0x8, count=4, local_stride=0x8, remote_stride=0x100, region=1
        ),
    )
    copies = cuda_ipc._copies(ReadJob(agent_name="a", ops=ops), peer)
    assert copies == [
        (0x500, 0x7000_0200 + 0x100, 0x60),
        (0x900, 0x7000_2000 + 0x10, 0x10),
        (0xA00, 0x8, 0x7000_2000 + 0x400, 0x100, 0x8, 4),
    ]
    assert sum(map(cuda_ipc._size, copies)) == 0x60 + 0x10 + 0x20


def test_copies_never_span_two_mappings_nor_leave_their_region() -> None:
    # Two regions of two allocations that happen to be mapped side by side in this process.
    regions = (
        Region(index=0, addr=0x10000, nbytes=0x100, device="cuda", ipc_handle=HANDLE),
        Region(index=1, addr=0x50000, nbytes=0x100, device="cuda", ipc_handle=bytes(reversed(HANDLE))),
    )
    peer = cuda_ipc._Peer(regions=regions, local={0: 0x7000_0000, 1: 0x7000_0100}, handles=())
    ops = (
        ReadOp(local_addr=0x500, remote_addr=0x10000, nbytes=0x100, region=0),
        ReadOp(local_addr=0x600, remote_addr=0x50000, nbytes=0x100, region=1),  # contiguous on both sides
        ReadOp(local_addr=0x700, remote_addr=0x50000, nbytes=0, region=1),  # nothing to copy
    )
    copies = cuda_ipc._copies(ReadJob(agent_name="a", ops=ops), peer)
    assert copies == [(0x500, 0x7000_0000, 0x100), (0x600, 0x7000_0100, 0x100)]
    for bad in (
        ReadOp(local_addr=0, remote_addr=0x10080, nbytes=0x81, region=0),  # one byte past the region
        ReadOp(local_addr=0, remote_addr=0xFFFF, nbytes=0x10, region=0),  # before it
        ReadOp(local_addr=0, remote_addr=0x10000, nbytes=0x10, count=3, local_stride=0x10, remote_stride=0x80),
    ):
        with pytest.raises(TransportError, match="outside its region"):
            cuda_ipc._copies(ReadJob(agent_name="a", ops=(bad,)), peer)


def test_a_read_of_a_region_the_peer_did_not_map_is_refused() -> None:
    peer = cuda_ipc._Peer(regions=(), local={}, handles=())
    with pytest.raises(Exception, match="not mapped"):
        cuda_ipc._copies(ReadJob(agent_name="a", ops=(ReadOp(local_addr=0, remote_addr=0, nbytes=8, region=3),)), peer)


def test_a_cpu_region_is_published_without_a_handle() -> None:
    exports = cuda_ipc.Exports()
    r = Region(index=0, addr=4096, nbytes=64)
    assert exports.regions([r]) == [r]
    assert exports.host == host_id()
