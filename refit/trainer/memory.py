"""Trainer memory a publisher exposes: few large regions, registered once, reused by every version.

Megatron's DDP already keeps parameters as views of a few contiguous buffers; those storages are
registered as they are. A model whose parameters are separate allocations (a bare GPTModel) is
moved once into one arena per device, so registration stays at one region per device instead of
one per tensor. Snapshot slots (for publishers that keep older versions readable) are arenas with
the same packed layout, filled by one copy per version.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refit.dtypes import device_of
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
    return [
        Block(addr=a.data_ptr(), nbytes=a.numel(), device=device_of(a)[0], device_id=device_of(a)[1], owner=a)
        for a in arenas.values()
    ]


def snapshot_blocks(params: Sequence[torch.Tensor]) -> tuple[list[int], list[Block]]:
    """A fresh snapshot slot for `params`: packed offsets and one owned block per device."""
    offsets, sizes = packed_offsets(params)
    arenas = new_arenas(sizes)
    blocks = [
        Block(addr=a.data_ptr(), nbytes=a.numel(), device=device_of(a)[0], device_id=device_of(a)[1], owner=a)
        for a in arenas.values()
    ]
    return offsets, blocks
