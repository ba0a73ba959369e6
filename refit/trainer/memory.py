"""Trainer memory a publisher exposes: few large regions, registered once, reused by every version.

Megatron's DDP already keeps parameters as views of a few contiguous buffers; those storages are
registered as they are. A model whose parameters are separate allocations (a bare GPTModel) is
moved once into one arena per device, so registration stays at one region per device instead of
one per tensor. Snapshot slots (for publishers that keep older versions readable) are arenas with
the same packed layout, used round-robin by a `SnapshotRing` and filled by one copy per version.
Tensors published as column blocks (`refit.trainer.blocks`) are stored blocked in those slots; a
live publisher keeps them in a `BlockedMirror`, one more arena per device refreshed per version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from refit.dtypes import device_of
from refit.errors import ConfigError
from refit.trainer.blocks import ColumnBlocks, copy_blocked
from refit.types import Region

logger = logging.getLogger(__name__)

ALIGN = 256  # bytes; keeps every view aligned for any dtype and for vectorised copies


@dataclass(frozen=True, kw_only=True, slots=True)
class Block:
    """A registered block of memory and the tensor that keeps it alive (if refit owns it)."""

    addr: int
    nbytes: int
    device: str
    device_id: int
    owner: torch.Tensor | None = None

    def region(self, index: int) -> Region:
        return Region(index=index, addr=self.addr, nbytes=self.nbytes, device=self.device, device_id=self.device_id)

    def holds(self, tensor: torch.Tensor) -> bool:
        start = tensor.data_ptr()
        return self.addr <= start and start + tensor.numel() * tensor.element_size() <= self.addr + self.nbytes


def byte_views(blocks: Sequence[Block], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A flat uint8 tensor over each block's memory (its owner, or the storage of one of `tensors`)."""
    storages = {t.untyped_storage().data_ptr(): t for t in tensors}
    views = []
    for b in blocks:
        if b.owner is not None:
            views.append(b.owner.view(-1).view(torch.uint8))
            continue
        t = storages.get(b.addr)
        if t is None:
            raise ConfigError(f"no tensor holds the registered block at {b.addr:#x}")
        views.append(torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()))
    return views


def storage_blocks(tensors: Sequence[torch.Tensor]) -> list[Block]:
    """The distinct storages behind `tensors`, one block each."""
    blocks: dict[int, Block] = {}
    for t in tensors:
        storage = t.untyped_storage()
        addr = storage.data_ptr()
        if addr not in blocks:
            device, device_id = device_of(t)
            blocks[addr] = Block(addr=addr, nbytes=storage.nbytes(), device=device, device_id=device_id)
    return sorted(blocks.values(), key=lambda b: b.addr)


def packed_offsets(tensors: Sequence[torch.Tensor]) -> tuple[list[int], dict[torch.device, int]]:
    """Byte offset of each tensor in its device's arena, and each arena's size."""
    sizes: dict[torch.device, int] = {}
    offsets = []
    for t in tensors:
        at = -(-sizes.get(t.device, 0) // ALIGN) * ALIGN
        offsets.append(at)
        sizes[t.device] = at + t.numel() * t.element_size()
    return offsets, sizes


def new_arenas(sizes: dict[torch.device, int]) -> dict[torch.device, torch.Tensor]:
    return {device: torch.empty(max(size, 1), dtype=torch.uint8, device=device) for device, size in sizes.items()}


def arena_view(arena: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    nbytes = like.numel() * like.element_size()
    return arena[offset : offset + nbytes].view(like.dtype).view(like.shape)


def consolidate(params: Sequence[torch.Tensor]) -> list[Block]:
    """Move `params` into one arena per device (once); the parameter objects stay the same.

    Optimizers and hooks keep working because they hold the Parameter objects, not their storage.
    """
    offsets, sizes = packed_offsets(params)
    arenas = new_arenas(sizes)
    with torch.no_grad():
        for p, offset in zip(params, offsets, strict=True):
            view = arena_view(arenas[p.device], offset, p)
            view.copy_(p)
            p.data = view
    logger.info("moved %d parameters into %d arena(s) of %s bytes", len(params), len(arenas), list(sizes.values()))
    return [_owned_block(a) for a in arenas.values()]


def synchronize(tensors: Sequence[torch.Tensor]) -> None:
    """Wait until every queued CUDA operation on the devices of `tensors` has completed.

    Bytes a remote reader fetches over NIXL are read outside any CUDA stream: whatever a stream
    still has queued for them (an optimizer step, a snapshot copy) must land first.
    """
    for device in sorted({t.device for t in tensors if t.is_cuda}, key=lambda d: d.index or 0):
        torch.cuda.synchronize(device)


def fill(
    arenas: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    offsets: Sequence[int],
    block_index: Sequence[int],
    layouts: Sequence[ColumnBlocks | None],
) -> None:
    """Copy each tensor to its offset in its device's arena (blocked where it has a layout); wait for the copies.

    copy_ on CUDA only queues the copy; no reader may be told about the arenas before it lands.
    """
    with torch.no_grad():
        for t, offset, index, layout in zip(tensors, offsets, block_index, layouts, strict=True):
            copy_blocked(arena_view(arenas[index], offset, t), t, layout)
    synchronize(arenas)


def _owned_block(arena: torch.Tensor) -> Block:
    device, device_id = device_of(arena)
    return Block(addr=arena.data_ptr(), nbytes=arena.numel(), device=device, device_id=device_id, owner=arena)


class SnapshotRing:
    """`slots` copies of a fixed list of tensors, each holding one version, reused round-robin.

    A new version takes an empty slot if there is one, else the slot holding the oldest version
    (versions only increase, so this is a ring over the last `slots` versions, whatever the gaps
    between version numbers). That version is retired (by the caller's `retire`) before a byte of
    its slot is overwritten, and the copy has landed before `write` returns. A tensor with a layout
    in `layouts` is stored as its column blocks (no extra memory: the blocks take its bytes).
    """

    def __init__(
        self, tensors: Sequence[torch.Tensor], slots: int, layouts: Sequence[ColumnBlocks | None] | None = None
    ) -> None:
        if slots < 1:
            raise ConfigError(f"a snapshot ring needs at least one slot, got {slots}")
        self._tensors = list(tensors)
        self._layouts = list(layouts) if layouts is not None else [None] * len(self._tensors)
        if len(self._layouts) != len(self._tensors):
            raise ConfigError(f"{len(self._layouts)} layouts for {len(self._tensors)} tensors")
        self.offsets, sizes = packed_offsets(self._tensors)
        devices = list(sizes)
        # One arena per device per slot; every slot has the same layout.
        self._arenas = [list(new_arenas(sizes).values()) for _ in range(slots)]
        self._slots = [[_owned_block(a) for a in arenas] for arenas in self._arenas]
        self._versions: list[int | None] = [None] * slots
        self.block_index = [devices.index(t.device) for t in self._tensors]

    @property
    def blocks(self) -> list[Block]:
        """Every slot's blocks (what a publisher registers once)."""
        return [b for slot in self._slots for b in slot]

    def slot_blocks(self, slot: int) -> list[Block]:
        return self._slots[slot]

    @property
    def versions(self) -> list[int]:
        """The versions the slots hold, oldest first."""
        return sorted(v for v in self._versions if v is not None)

    def slot_of(self, version: int) -> int:
        """The slot holding `version`."""
        return self._versions.index(version)

    def next_slot(self) -> int:
        """The slot the next version will take: an empty one, else the one holding the oldest version."""
        held = {v: i for i, v in enumerate(self._versions) if v is not None}
        if len(held) < len(self._versions):
            return self._versions.index(None)
        return held[min(held)]

    def write(self, version: int, retire: Callable[[int], object]) -> int:
        """Copy the tensors into the next slot as `version` and return the slot.

        The slot's old version is passed to `retire` first; if that raises, nothing is overwritten.
        """
        held = self.versions
        if held and version <= held[-1]:
            raise ConfigError(f"version {version} is not newer than {held[-1]}, the newest snapshot")
        slot = self.next_slot()
        old = self._versions[slot]
        if old is not None:
            retire(old)
        # From here on the slot's bytes are neither the old version nor (yet) the new one.
        self._versions[slot] = None
        fill(self._arenas[slot], self._tensors, self.offsets, self.block_index, self._layouts)
        self._versions[slot] = version
        return slot

    def drain(self) -> list[int]:
        """Forget every held version (oldest first) and return them, for the caller to retire."""
        held = self.versions
        self._versions = [None] * len(self._versions)
        return held


class BlockedMirror:
    """A registered copy of some live tensors in their column-block layout, refreshed for each version.

    A live publisher (`snapshots=0`) cannot store a parameter blocked where the optimizer needs it
    whole, so the tensors it publishes as column blocks are copied here (one arena per device,
    registered once, packed like snapshot slots) by `refresh`, which returns once the copy has landed.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], layouts: Sequence[ColumnBlocks]) -> None:
        if len(layouts) != len(tensors):
            raise ConfigError(f"{len(layouts)} layouts for {len(tensors)} tensors")
        self._tensors, self._layouts = list(tensors), list(layouts)
        self.offsets, sizes = packed_offsets(self._tensors)
        devices = list(sizes)
        self._arenas = list(new_arenas(sizes).values())
        self.blocks = [_owned_block(a) for a in self._arenas]
        self.block_index = [devices.index(t.device) for t in self._tensors]
        self.nbytes = sum(b.nbytes for b in self.blocks)

    def refresh(self) -> None:
        """Copy the tensors' current values in, blocked; the copy has landed (on GPU too) when this returns."""
        fill(self._arenas, self._tensors, self.offsets, self.block_index, self._layouts)
