"""Turn staged pieces into the engine's tensors: slicing and concatenation, nothing else.

QKV un-interleaving, gate/up splitting, vocab-padding removal and TP slicing were all decided by
the planner as row intervals; here each target is cut out of the pieces that cover it. Rows a target
holds past the published ones (an engine's own vocabulary padding) are zeros, and so is a target
with no rows at all (an engine rank whose vocabulary share is all padding). A piece the planner read
as its enclosing block is a strided view of staging, cut like any other.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from refit.dtypes import torch_dtype
from refit.errors import LayoutError
from refit.plan.records import Chunk, Piece, Plan
from refit.plan.targets import Target


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


def mirrored(piece: Piece) -> Piece:
    """`piece` as its trainer rank's region lays it out: at its remote offset, blocks at their remote
    stride (a buffer over that region takes the place of staging)."""
    return dataclasses.replace(piece, local_offset=piece.remote_offset,
                               local_stride=piece.remote_stride if piece.count > 1 else 0)  # fmt: skip


def mirrored_groups(pieces: Sequence[Piece]) -> list[tuple[tuple[int, int], tuple[Piece, ...]]]:
    """`pieces`, `mirrored`, by the (rank, region index) that holds them, in the order first seen."""
    groups: dict[tuple[int, int], list[Piece]] = defaultdict(list)
    for p in pieces:
        groups[p.rank, p.region].append(mirrored(p))
    return [(key, tuple(group)) for key, group in groups.items()]


def source_view(piece: Piece, regions: Mapping[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """The bytes of `piece` where its trainer rank holds them, as a tensor of its shape: a view of
    `regions[(rank, region)]` (a flat uint8 tensor over that region, mapped in this process), each
    block at its remote offset and stride. What `piece_view` sees in staging, without staging."""
    return piece_view(mirrored(piece), regions[piece.rank, piece.region])


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


def assemble_chunk(plan: Plan, chunk: Chunk, staging: torch.Tensor) -> dict[str, torch.Tensor]:
    """The targets a chunk of whole layers completes (`Chunk.targets`), from its pieces in `staging`."""
    wanted = set(chunk.targets)
    targets = tuple(t for t in plan.targets if t.hf_name in wanted)
    return assemble(Plan(targets=targets, pieces=chunk.pieces, reads=chunk.reads, staging_bytes=chunk.staging_bytes,
                         bytes_by_rank={}), staging)  # fmt: skip


def scatter(
    pieces: Sequence[Piece], targets: Sequence[Target], staging: torch.Tensor, dests: Mapping[str, torch.Tensor]
) -> None:
    """Copy each staged piece straight into the parts of the engine tensors (`dests`) it covers.

    The streamed counterpart of `assemble`: a target's pieces may arrive in different chunks, so
    each piece is written where it belongs instead of being joined with the others first. One
    batched copy per call. Padding rows are written by `zero_padding`.
    """
    outs, ins = scatter_pairs(pieces, targets, staging, dests)
    if outs:
        with torch.no_grad():
            torch._foreach_copy_(outs, ins, non_blocking=True)


Staged = torch.Tensor | Mapping[tuple[int, int], torch.Tensor]


def scatter_pairs(
    pieces: Sequence[Piece], targets: Sequence[Target], staging: Staged, dests: Mapping[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (destinations, sources) views that `scatter` copies: views of `dests` and of `staging`, a
    slot the pieces were pulled into or the trainers' regions themselves (`source_view`).

    They stay valid while neither `staging` nor the engine tensors are reallocated, so a receiver
    that installs the same plan again can keep them (and replay their copies) instead of rebuilding.
    """
    by_source: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        by_source[t.source].append(t)
    outs: list[torch.Tensor] = []
    ins: list[torch.Tensor] = []
    for p in pieces:
        view = piece_view(p, staging) if isinstance(staging, torch.Tensor) else source_view(p, staging)
        for t in by_source[p.tensor]:
            dest = dests[t.hf_name]
            if t.dim is None:
                outs.append(dest)
                ins.append(view)
                continue
            at, runs = 0, []
            for a, b in t.rows:
                lo, hi = max(a, p.start), min(b, p.stop)
                if lo < hi:
                    runs.append((lo - p.start, at + lo - a, hi - lo))
                at += b - a
            for src, dst in _copies(view, dest, t.dim, runs):
                outs.append(dst)
                ins.append(src)
    return outs, ins


def _copies(
    view: torch.Tensor, dest: torch.Tensor, dim: int, runs: list[tuple[int, int, int]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(source, destination) pairs for `runs` of (source row, destination row, rows) along `dim`.

    Runs of equal length at constant strides on both sides (the q, k or v rows of every query group
    in a fused QKV piece, say) become one copy with an extra leading dimension: one kernel instead
    of one per run, which is what bounds a GPU install of many small runs.
    """
    if len(runs) >= 2:
        (s0, d0, n), (s1, d1, _) = runs[0], runs[1]
        ds, dd = s1 - s0, d1 - d0
        if ds > 0 and dd > 0 and all((s, d, m) == (s0 + i * ds, d0 + i * dd, n) for i, (s, d, m) in enumerate(runs)):
            src = _grouped(view.narrow(dim, s0, n), view.stride(dim) * ds, len(runs))
            dst = _grouped(dest.narrow(dim, d0, n), dest.stride(dim) * dd, len(runs))
            return [(src, dst)]
    return [(view.narrow(dim, s, n), dest.narrow(dim, d, n)) for s, d, n in runs]


def _grouped(first: torch.Tensor, step: int, count: int) -> torch.Tensor:
    """`count` copies of the block `first`, each `step` elements after the previous, as one tensor."""
    return first.as_strided((count, *first.shape), (step, *first.stride()), first.storage_offset())


def padding(targets: Sequence[Target]) -> tuple[tuple[str, int, int, int], ...]:
    """(target, dim, first row, rows) of each target's rows that no trainer publishes (an engine's own
    vocabulary padding): a scan of every target, so a receiver keeps it with its plan's reads."""
    out = []
    for t in targets:
        if t.dim is None:
            continue
        published = sum(b - a for a, b in t.rows)
        if published < t.shape[t.dim]:
            out.append((t.hf_name, t.dim, published, t.shape[t.dim] - published))
    return tuple(out)


def zero_padding(targets: Sequence[Target], dests: Mapping[str, torch.Tensor]) -> None:
    """Zero the rows of each target that no trainer publishes (an engine's own vocabulary padding)."""
    zero_rows(padding(targets), dests)


def zero_rows(rows: Sequence[tuple[str, int, int, int]], dests: Mapping[str, torch.Tensor]) -> None:
    """Zero `padding`'s rows in `dests`."""
    with torch.no_grad():
        for name, dim, start, length in rows:
            dests[name].narrow(dim, start, length).zero_()
