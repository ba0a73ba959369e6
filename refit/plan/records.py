"""What a plan is: pieces of global tensors staged from trainer ranks, the reads that move them, and
the plan that holds both with its modelled cost. Plain values; `refit.plan.planner` makes them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from refit.plan.cost import DEFAULT_COST, LinkCost
from refit.plan.targets import Target
from refit.types import SourceRecord


@dataclass(frozen=True, kw_only=True, slots=True)
class Piece:
    """One interval of one Megatron tensor, read from trainer rank `rank` into staging.

    The piece is `count` blocks of `block_bytes`; block i sits at `remote_offset + i*remote_stride`
    in the trainer's region. In staging, block i starts at `local_offset + i*block_bytes` (the staged
    piece is a dense tensor of `shape`) or, when `local_stride` is set, at `local_offset +
    i*local_stride`: the piece was read as its enclosing block (every row of the blocks, the unwanted
    bytes between them included), which staging mirrors, so the piece is a strided view there.
    """

    tensor: str
    rank: int
    dim: int | None
    start: int
    stop: int
    shape: tuple[int, ...]
    dtype: str
    region: int
    remote_offset: int
    block_bytes: int
    count: int
    remote_stride: int
    local_offset: int = 0
    local_stride: int = 0  # 0: blocks packed in staging; else read as the enclosing block (= remote_stride)

    @property
    def nbytes(self) -> int:
        """The bytes the engine needs."""
        return self.block_bytes * self.count

    @property
    def staged_bytes(self) -> int:
        """The bytes the piece spans in staging (its enclosing block when `local_stride` is set)."""
        if not self.local_stride:
            return self.nbytes
        return (self.count - 1) * self.local_stride + self.block_bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class Read:
    """One transfer descriptor (or `count` strided ones): what the transport actually moves."""

    rank: int
    region: int
    remote_offset: int
    local_offset: int
    block_bytes: int
    count: int = 1
    remote_stride: int = 0

    @property
    def nbytes(self) -> int:
        return self.block_bytes * self.count

    @property
    def descriptors(self) -> int:
        """Transfer descriptors on the wire: one per block, unless the blocks touch (then one)."""
        return block_descriptors(nbytes=self.block_bytes, count=self.count, stride=self.remote_stride)


@dataclass(frozen=True, kw_only=True, slots=True)
class DirectRead:
    """A contiguous run of a trainer rank's bytes read straight into a contiguous run of one engine
    tensor (the whole tensor, or some of its first-dimension rows): no staging, no copy."""

    target: str  # the engine tensor's name (`Target.hf_name`)
    rank: int
    region: int
    remote_offset: int
    nbytes: int
    offset: int = 0  # where the run starts in the engine tensor, in bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class Chunk:
    """A part of a plan staged at once: its pieces, the reads that move them, and its staging size.

    Offsets are the chunk's own (each chunk starts at 0 of whichever staging buffer it is pulled into).
    Chunks of whole layers (`refit.plan.layered`, for engines installing layer by layer) name the
    targets they complete and their layers; other chunks leave both empty.
    """

    pieces: tuple[Piece, ...]
    reads: tuple[Read, ...]
    staging_bytes: int
    targets: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """Everything one engine rank does for one refit, before any byte moves, and what it costs.

    `chunks` stream through staging one after another (one chunk when the staged pieces fit the
    window); `pieces` and `reads` are all of theirs, each at its own chunk's offsets. `direct`
    tensors bypass staging. `staging_bytes` is the staging held at once: the one chunk, or the
    `slots` largest chunks when chunks stream through that many staging slots (pulls run ahead of
    installs).
    """

    targets: tuple[Target, ...]
    pieces: tuple[Piece, ...]
    reads: tuple[Read, ...]
    staging_bytes: int
    bytes_by_rank: dict[int, int]  # useful bytes per trainer rank
    cost: LinkCost = DEFAULT_COST  # the link the plan was priced for
    chunks: tuple[Chunk, ...] = ()
    direct: tuple[DirectRead, ...] = ()
    slots: int = 2  # staging slots chunks stream through, when there are several chunks

    @property
    def streamed(self) -> bool:
        """Whether the staged pieces are split into several chunks (and so installed chunk by chunk)."""
        return len(self.chunks) > 1

    @property
    def slot_count(self) -> int:
        """Staging buffers this plan's pull holds: `slots` when chunks stream, else one."""
        return self.slots if self.streamed else 1

    def sources_read(self, sources: Sequence[SourceRecord]) -> list[SourceRecord]:
        """The records among `sources` of the trainer ranks this plan reads from."""
        return [s for s in sources if s.rank in self.bytes_by_rank]

    @property
    def total_bytes(self) -> int:
        """Bytes the engine needs (holes and enclosing blocks read along are not counted)."""
        return sum(self.bytes_by_rank.values())

    @property
    def wire_bytes(self) -> int:
        """Bytes actually moved, holes and enclosing blocks included."""
        return sum(r.nbytes for r in self.reads) + self.direct_bytes

    @property
    def direct_bytes(self) -> int:
        """Bytes read straight into the engine's memory."""
        return sum(d.nbytes for d in self.direct)

    @property
    def wire_by_rank(self) -> dict[int, int]:
        """Bytes actually moved, per trainer rank."""
        out: dict[int, int] = defaultdict(int)
        for r in self.reads:
            out[r.rank] += r.nbytes
        for d in self.direct:
            out[d.rank] += d.nbytes
        return dict(out)

    @property
    def descriptors(self) -> int:
        """Transfer descriptors on the wire (a strided read is one per block; a direct read is one)."""
        chunks = self.chunks or (Chunk(pieces=self.pieces, reads=self.reads, staging_bytes=self.staging_bytes),)
        return sum(count_descriptors(c.reads) for c in chunks) + len(self.direct)

    @property
    def modelled_s(self) -> float:
        """Modelled seconds of the pull over `cost`: wire bytes over bandwidth plus descriptors."""
        return self.cost.seconds(nbytes=self.wire_bytes, descriptors=self.descriptors)


def block_descriptors(*, nbytes: int, count: int, stride: int) -> int:
    """Descriptors of `count` blocks of `nbytes`, `stride` apart: one per block, unless they touch (then one)."""
    if nbytes <= 0 or count <= 0:
        return 0
    return 1 if count == 1 or stride == nbytes else count


def count_descriptors(reads: Iterable[Read]) -> int:
    """Descriptors the transport posts for `reads` (`refit.transport.jobs.merge_reads`, without expanding).

    Strided blocks are one descriptor each. Blocks of different reads merge when they touch both in
    staging and in the trainer's region; the staged blocks of a read are packed, so only the last
    block of one read and the first of another can touch. Counted per (trainer rank, region).
    """
    total, firsts, lasts = 0, {}, []
    for r in reads:
        n = block_descriptors(nbytes=r.block_bytes, count=r.count, stride=r.remote_stride)
        if not n:
            continue
        total += n
        firsts[(r.rank, r.region, r.local_offset)] = r.remote_offset
        last_end = r.remote_offset + (r.count - 1) * r.remote_stride + r.block_bytes
        lasts.append((r.rank, r.region, r.local_offset + r.count * r.block_bytes, last_end))
    return total - sum(1 for rank, region, local, remote in lasts if firsts.get((rank, region, local)) == remote)
