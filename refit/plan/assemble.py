"""Turn staged pieces into the engine's tensors: slicing and concatenation, nothing else.

QKV un-interleaving, gate/up splitting, vocab-padding removal and TP slicing were all decided by
the planner as row intervals; here each target is cut out of the pieces that cover it. Rows a target
holds past the published ones (an engine's own vocabulary padding) are zeros, and so is a target
with no rows at all (an engine rank whose vocabulary share is all padding). A piece the planner read
as its enclosing block is a strided view of staging, cut like any other.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from refit.dtypes import torch_dtype
from refit.errors import LayoutError
from refit.plan.planner import Piece, Plan


def piece_view(piece: Piece, staging: torch.Tensor) -> torch.Tensor:
    """The staged bytes of `piece` as a tensor of its shape (a view of `staging`, a flat uint8 buffer).

    Dense, unless the piece was read as its enclosing block: then block i (the i-th index over the
    dims before `piece.dim`) starts `local_stride` bytes after block i - 1, and the view skips the
    unneeded bytes between blocks.
    """
    raw = staging[piece.local_offset : piece.local_offset + piece.staged_bytes].view(torch_dtype(piece.dtype))
    if not piece.local_stride or piece.count == 1:
        return raw.view(piece.shape)
    assert piece.dim is not None  # only a slice of an inner dim is strided
    shape, item = piece.shape, raw.element_size()
    block = piece.local_stride // item  # elements from one block's start to the next
    strides = [block * math.prod(shape[d + 1 : piece.dim]) for d in range(piece.dim)]
    strides += [math.prod(shape[d + 1 :]) for d in range(piece.dim, len(shape))]
    return raw.as_strided(shape, strides)


def assemble(plan: Plan, staging: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every target of `plan` as a tensor; views of `staging` where no copy is needed."""
    by_tensor: dict[str, list[Piece]] = defaultdict(list)
    for p in plan.pieces:
        by_tensor[p.tensor].append(p)
    for pieces in by_tensor.values():
        pieces.sort(key=lambda p: p.start)
    out: dict[str, torch.Tensor] = {}
    for target in plan.targets:
        pieces = by_tensor.get(target.source)
        if target.dim is not None and not target.rows:  # nothing published for it: all padding
            out[target.hf_name] = torch.zeros(target.shape, dtype=torch_dtype(target.dtype), device=staging.device)
            continue
        if not pieces:
            raise LayoutError(f"{target.hf_name}: nothing of {target.source} was staged")
        if target.dim is None:
            out[target.hf_name] = piece_view(pieces[0], staging)
            continue
        parts = []
        for a, b in target.rows:
            for p in pieces:
                lo, hi = max(a, p.start), min(b, p.stop)
                if lo < hi:
                    parts.append(piece_view(p, staging).narrow(target.dim, lo - p.start, hi - lo))
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=target.dim)
        missing = target.shape[target.dim] - tensor.shape[target.dim]
        if missing > 0:  # rows past the published ones (an engine's extra vocab padding) are zeros
            pad = list(tensor.shape)
            pad[target.dim] = missing
            tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=target.dim)
        if tuple(tensor.shape) != target.shape:
            raise LayoutError(f"{target.hf_name}: assembled {tuple(tensor.shape)}, expected {target.shape}")
        out[target.hf_name] = tensor
    return out
