"""The publisher's memory helpers: packed arena offsets and the snapshot ring."""

from __future__ import annotations

import pytest
import torch

from refit.errors import ConfigError
from refit.trainer.memory import ALIGN, SnapshotRing, arena_view, packed_offsets

CPU = torch.device("cpu")


def tensors(fill: float = 0.0) -> list[torch.Tensor]:
    """Mixed sizes and dtypes, none a multiple of ALIGN bytes."""
    return [
        torch.full((3, 5), fill, dtype=torch.float32),  # 60 bytes
        torch.full((7,), fill, dtype=torch.bfloat16),  # 14 bytes
        torch.full((2, 300), fill, dtype=torch.float32),  # 2400 bytes
        torch.full((1,), fill, dtype=torch.float64),  # 8 bytes
    ]


def test_packed_offsets_align_every_tensor_and_size_each_arena() -> None:
    offsets, sizes = packed_offsets(tensors())
    assert offsets == [0, ALIGN, 2 * ALIGN, 2 * ALIGN + 2560]
    assert sizes == {CPU: 2 * ALIGN + 2560 + 8}
    assert packed_offsets([]) == ([], {})


def test_packed_offsets_pack_each_device_separately() -> None:
    meta = torch.device("meta")  # a second device that needs no hardware; offsets only read sizes
    ts = [torch.zeros(10), torch.zeros(10, device=meta), torch.zeros(3), torch.zeros(1, device=meta)]
    offsets, sizes = packed_offsets(ts)
    assert offsets == [0, 0, ALIGN, ALIGN]
    assert sizes == {CPU: ALIGN + 12, meta: ALIGN + 4}


def slot_contents(ring: SnapshotRing, slot: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
    arenas = [b.owner for b in ring.slot_blocks(slot)]
    return [
        arena_view(arenas[i], off, t).clone() for t, i, off in zip(like, ring.block_index, ring.offsets, strict=True)
    ]


def test_ring_keeps_the_last_versions_whatever_their_numbers() -> None:
    """Versions 2, 4, 6 with two slots: 4 and 6 stay, 2 is retired (not 2 and 4: `version % slots`)."""
    live = tensors()
    ring = SnapshotRing(live, slots=2)
    retired: list[int] = []
    slots = {}
    for version in (2, 4, 6):
        for t in live:
            t.fill_(version)  # what an optimizer step does to the live parameters
        slots[version] = ring.write(version, retired.append)
    assert retired == [2]
    assert ring.versions == [4, 6]
    assert slots[6] == slots[2] != slots[4]
    for version in (4, 6):
        for got in slot_contents(ring, slots[version], live):
            assert torch.equal(got, torch.full_like(got, version)), version


def test_ring_retires_before_overwriting_and_fills_empty_slots_first() -> None:
    live = tensors(1.0)
    ring = SnapshotRing(live, slots=3)
    seen: list[tuple[int, list[torch.Tensor]]] = []

    def retire(version: int) -> None:
        seen.append((version, slot_contents(ring, ring.next_slot(), live)))  # the slot about to be reused

    order = []
    for version in (1, 5, 9, 10, 20):
        for t in live:
            t.fill_(version)
        order.append(ring.write(version, retire))
    assert order == [0, 1, 2, 0, 1]
    assert [v for v, _ in seen] == [1, 5]
    for version, contents in seen:  # still the retired version's bytes when it was retired
        assert all(torch.equal(c, torch.full_like(c, version)) for c in contents)
    assert ring.versions == [9, 10, 20]


def test_ring_overwrites_nothing_when_retiring_fails() -> None:
    live = tensors(1.0)
    ring = SnapshotRing(live, slots=1)
    ring.write(1, lambda v: None)

    def unreachable(version: int) -> None:
        raise ConnectionError("catalog down")

    for t in live:
        t.fill_(2.0)
    with pytest.raises(ConnectionError):
        ring.write(2, unreachable)
    assert ring.versions == [1]
    assert all(torch.equal(c, torch.full_like(c, 1.0)) for c in slot_contents(ring, 0, live))


def test_ring_refuses_old_versions_and_drains() -> None:
    ring = SnapshotRing(tensors(), slots=2)
    ring.write(3, lambda v: None)
    ring.write(4, lambda v: None)
    with pytest.raises(ConfigError, match="not newer"):
        ring.write(4, lambda v: None)
    assert ring.drain() == [3, 4]
    assert ring.versions == []
    assert ring.next_slot() == 0
    assert len(ring.blocks) == 2  # one CPU arena per slot, kept (and registered) until the publisher closes
    with pytest.raises(ConfigError, match="at least one slot"):
        SnapshotRing(tensors(), slots=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous copy exists only on CUDA")
def test_ring_write_returns_after_the_gpu_copy_has_landed() -> None:
    """A reader outside the copy's stream (NIXL reads the slot directly) must see the new bytes.

    The copy is queued behind a long kernel on the current stream; without a synchronise in
    `write`, the slot read on an idle side stream would still hold the old bytes. Everything the
    read needs is allocated beforehand: a cudaMalloc would synchronise the device by itself.
    """
    live = [torch.full((64, 1024, 1024), 1.0, device="cuda")]
    ring = SnapshotRing(live, slots=1)
    ring.write(1, lambda v: None)
    side = torch.cuda.Stream()
    got = torch.empty_like(live[0])
    torch.cuda.synchronize()
    live[0].fill_(2.0)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time ahead of the copy
    slot = ring.write(2, lambda v: None)
    with torch.cuda.stream(side):
        got.copy_(arena_view(ring.slot_blocks(slot)[0].owner, ring.offsets[0], live[0]))
    side.synchronize()
    assert torch.equal(got, torch.full_like(got, 2.0))
