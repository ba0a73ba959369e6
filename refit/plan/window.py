"""Bounded staging: which engine tensors skip staging (read straight into the engine), and how the
rest is cut into chunks that stream through a staging window.

A chunk is laid out like a whole plan (`refit.plan.placement.place`), at its own offsets, so each
is pulled into one staging buffer and installed before that buffer is reused. Every chunk takes
from each trainer rank in proportion to what that rank serves, so all their links carry every
chunk, and follows each rank's address order, so its pieces still merge into few reads. A piece larger than a
chunk is cut along its own dimension; only a piece that cannot be cut (a whole tensor, or a
slice whose narrowest cut is larger) makes a chunk larger than the limit.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from collections.abc import Callable, Sequence

from refit.plan.placement import Choice, Geometry, Holder, Need, enclosing_span, geometry, place
from refit.plan.records import Chunk, DirectRead, Piece, Read
from refit.plan.targets import Target

logger = logging.getLogger(__name__)

# Staging slots of a streamed plan: chunks are a third of the window, so two can be pulled while the
# third is installed (see `layout`).
SLOTS = 3

Located = tuple[Choice, Geometry]


def direct_reads(
    located: Sequence[Located],
    enclosed: set[int],
    targets: Sequence[Target],
    accept: Callable[[Target], bool],
    min_bytes: int = 0,
    whole_min_bytes: int | None = None,
) -> tuple[set[int], list[DirectRead]]:
    """The pieces that land in the engine as contiguous runs on both sides, read there directly.

    A piece qualifies when it is one contiguous run of its trainer rank's bytes and every part of
    it that a target takes is a contiguous run of that engine tensor too: a whole tensor, or rows
    of a tensor split on its first dimension (a TP shard of a column-parallel weight, the q, k or
    v rows of one query group, a vocabulary share). Each such part becomes one read straight into
    the engine's memory, where `accept` allows it (the destination is contiguous and registrable)
    and it has at least `min_bytes`; a piece that is one run of one engine tensor, at least
    `whole_min_bytes` where given (a link that pays per descriptor stages small ones so their
    neighbours merge; one that does not reads them directly, but still stages a piece that would be
    cut into many small reads). Returns the pieces' indices in `located` and their reads.
    """
    by_source: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        by_source[t.source].append(t)
    chosen: set[int] = set()
    reads: list[DirectRead] = []
    for i, (choice, geo) in enumerate(located):
        parts = None
        if i not in enclosed and geo.count == 1:
            parts = _direct_parts(choice, geo, by_source, accept, min_bytes, whole_min_bytes)
        if parts is None:
            continue
        chosen.add(i)
        reads.extend(parts)
    return chosen, reads


def _direct_parts(
    choice: Choice,
    geo: Geometry,
    by_source: dict[str, list[Target]],
    accept: Callable[[Target], bool],
    min_bytes: int,
    whole_min_bytes: int | None = None,
) -> list[DirectRead] | None:
    """The direct reads of one contiguous piece, or None if any part of it must be staged."""
    need, holder = choice.need, choice.holder
    d = need.dim
    parts: list[DirectRead] = []

    def read(target: Target, src_byte: int, dst_byte: int, nbytes: int) -> DirectRead:
        return DirectRead(target=target.hf_name, rank=holder.rank, region=holder.desc.region,
                          remote_offset=geo.remote_offset + src_byte, nbytes=nbytes, offset=dst_byte)  # fmt: skip

    for t in by_source[need.tensor]:
        if d is None:
            if t.dim is not None or tuple(geo.shape) != t.shape:
                return None
            parts.append(read(t, 0, 0, geo.nbytes))
            continue
        at = 0
        for a, b in t.rows:
            lo, hi = max(a, need.start), min(b, need.stop)
            if lo < hi:
                # Rows of a piece are contiguous on both sides where no dimension lies outside them,
                # or where they are the whole piece and the whole tensor (a row-parallel shard at
                # matched TP, say).
                whole = tuple(geo.shape) == t.shape and hi - lo == t.shape[d]
                sliced = math.prod(geo.shape[:d]) == 1 and math.prod(t.shape[:d]) == 1
                if not (whole or sliced) or geo.shape[d + 1 :] != t.shape[d + 1 :]:
                    return None
                row = geo.nbytes // (need.stop - need.start)
                parts.append(read(t, (lo - need.start) * row, (at + lo - a) * row, (hi - lo) * row))
            at += b - a
    if not parts:
        return None
    if len(parts) == 1 and whole_min_bytes is not None:
        min_bytes = whole_min_bytes
    for part in parts:
        target = next(t for t in by_source[need.tensor] if t.hf_name == part.target)
        if part.nbytes < min_bytes or target.dtype != holder.desc.dtype or not accept(target):
            return None
    return parts


def _cut(choice: Choice, geo: Geometry, limit: int, cap: int) -> list[Located]:
    """`choice` cut along its dimension into pieces of at most `limit` bytes (where it can be).

    Cuts fall on the shard's digest block boundaries (`refit.digest`) where a block fits in `cap`
    (the chunk limit), so each piece holds whole blocks and a receiver can verify every byte.
    """
    need, holder = choice.need, choice.holder
    width = need.stop - need.start
    if need.dim is None or width <= 1:
        return [(choice, geo)]
    per_row = geo.nbytes // width
    step = max(1, limit // per_row)
    desc = holder.desc
    block = desc.digest_block if need.dim == max(desc.partition_dim, 0) else 0
    if block > 1 and block * per_row <= cap:
        step = max(step, block)
    out: list[Located] = []
    start = need.start
    while start < need.stop:
        stop = min(start + step, need.stop)
        if block > 1 and stop < need.stop:  # back to the last block boundary, if that leaves a piece
            local = holder.local + stop - need.start
            aligned = stop - local % block
            stop = aligned if aligned > start else stop
        sub_holder = Holder(rank=holder.rank, desc=holder.desc, local=holder.local + start - need.start)
        sub = Need(tensor=need.tensor, dim=need.dim, start=start, stop=stop, holders=(sub_holder,))
        out.append((Choice(need=sub, holder=sub_holder), geometry(sub, sub_holder)))
        start = stop
    return out


def chunks(
    located: Sequence[Located], enclosed: set[int], bridges: Callable[[int], bool], limit: int
) -> list[tuple[list[Piece], list[Read], int]]:
    """Lay `located` out as chunks of at most `limit` staging bytes each; `enclosed` as in `place`."""

    # 1. Each trainer rank's share of a chunk is in proportion to what it serves, so every rank's
    #    link is busy during every chunk's pull and all ranks run out together. Pieces are cut to fit
    #    their rank's share (an enclosing block that does not fit is read strided instead).
    def span(i: int) -> int:
        return enclosing_span(located[i][1]) if i in enclosed else located[i][1].nbytes

    totals: dict[int, int] = defaultdict(int)
    for i, (choice, _) in enumerate(located):
        totals[choice.holder.rank] += span(i)
    total = sum(totals.values()) or 1
    quota = {rank: max(1, limit * n // total) for rank, n in totals.items()}
    items: list[tuple[Located, bool]] = []
    for i, (choice, geo) in enumerate(located):
        share = quota[choice.holder.rank]
        whole = i in enclosed and enclosing_span(geo) <= share
        if whole or geo.nbytes <= share:
            items.append(((choice, geo), whole))
        else:
            items.extend((part, False) for part in _cut(choice, geo, share, limit))
    items.sort(key=lambda it: (it[0][0].holder.rank, it[0][0].holder.desc.region, it[0][1].remote_offset))

    # 2. Runs of about `limit` bytes: each takes about its quota from every rank, in address order.
    def size(item: tuple[Located, bool]) -> int:
        return enclosing_span(item[0][1]) if item[1] else item[0][1].nbytes

    queues: dict[int, deque[tuple[Located, bool]]] = defaultdict(deque)
    for item in items:
        queues[item[0][0].holder.rank].append(item)
    runs: list[list[tuple[Located, bool]]] = []
    while any(queues.values()):
        run: list[tuple[Located, bool]] = []
        for rank, queue in queues.items():
            taken = 0
            while queue and (taken == 0 or taken + size(queue[0]) <= quota[rank]):
                taken += size(queue[0])
                run.append(queue.popleft())
        runs.append(run)
    # 3. A run whose layout (alignment, holes read along) ends up over the limit is halved until it
    #    fits or is a single piece.
    out: list[tuple[list[Piece], list[Read], int]] = []
    while runs:
        run = runs.pop(0)
        laid = place([it[0] for it in run], {k for k, it in enumerate(run) if it[1]}, bridges)
        if laid[2] > limit and len(run) > 1:
            half = len(run) // 2
            runs[:0] = [run[:half], run[half:]]
            continue
        if laid[2] > limit:
            logger.warning("a piece of %s needs %d staging bytes, over the chunk limit %d", run[0][0][0].need.tensor,
                           laid[2], limit)  # fmt: skip
        out.append(laid)
    return out


def layout(
    located: Sequence[Located], enclosed: set[int], bridges: Callable[[int], bool], window: int | None
) -> tuple[Chunk, ...]:
    """The plan's staging: one chunk when everything fits `window` (or no window), else chunks of at
    most a `SLOTS`-th of it each, streamed through that many slots.

    With two slots, the pull of chunk k + 1 could start only once chunk k had landed and chunk k - 1
    was installed, so every pull queued behind the direct reads in flight (a link serves a peer's
    transfers in order) while the install waited for it: on two H200s, llama-3-8b trainer TP2 ->
    engine TP1, 13 chunks of ~480 MiB landed ~1.6 ms apart. With a third slot a second pull is always
    queued, and 22 chunks of ~330 MiB landed ~0.95 ms apart, interleaved with the direct batches;
    both then end with the link (the refit's time measured within run-to-run noise of each other).
    """
    pieces, reads, staging = place(located, enclosed, bridges)
    if window is None or staging <= window:
        return (Chunk(pieces=tuple(pieces), reads=tuple(reads), staging_bytes=staging),)
    return tuple(
        Chunk(pieces=tuple(p), reads=tuple(r), staging_bytes=s)
        for p, r, s in chunks(located, enclosed, bridges, max(window // SLOTS, 1))
    )


def peak_staging(parts: Sequence[Chunk], slots: int) -> int:
    """Staging held at once: the one chunk, or the `slots` largest when pulls overlap installs."""
    sizes = sorted((c.staging_bytes for c in parts), reverse=True)
    return sum(sizes[: slots if len(parts) > 1 else 1])
