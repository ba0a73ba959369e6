"""What a pull costs: bytes over the link's bandwidth, plus a fixed time per transfer descriptor.

A fast link pays for every descriptor it moves (posting, completion, and on RDMA one work request
per descriptor), so ten thousand 128-byte reads take far longer than their bytes suggest. The
planner prices its choices with this model: whether a small hole between two pieces of one source
is read along (one descriptor fewer) and whether a strided slice (one descriptor per block) is
better read as its enclosing contiguous block and cut locally. `refit-bench plan` prices whole
fleets with it.

The model is linear, `seconds = bytes / bandwidth_Bps + descriptors * descriptor_s`, and each preset
is fitted to a measurement; the measurements themselves are not linear in the descriptor size (a
link hides some of the per-descriptor time behind large transfers), so each preset says at which
descriptor size it was fitted.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from refit.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkCost:
    """One link's bandwidth (bytes per second) and the time each transfer descriptor adds (seconds)."""

    bandwidth_Bps: float
    descriptor_s: float

    def __post_init__(self) -> None:
        if not self.bandwidth_Bps > 0 or not self.descriptor_s >= 0:
            raise ConfigError(
                f"a link needs bandwidth_Bps > 0 and descriptor_s >= 0, got {self.bandwidth_Bps}, {self.descriptor_s}"
            )

    def seconds(self, *, nbytes: int, descriptors: int) -> float:
        """Modelled time to move `nbytes` in `descriptors` transfer descriptors."""
        return nbytes / self.bandwidth_Bps + descriptors * self.descriptor_s

    @property
    def break_even_bytes(self) -> float:
        """Bytes the link moves in one descriptor's time: a hole shorter than this is cheaper read along."""
        return self.bandwidth_Bps * self.descriptor_s

    def bridges(self, hole_bytes: int) -> bool:
        """Whether reading `hole_bytes` along costs less than the extra descriptor that skipping them needs."""
        return hole_bytes == 0 or hole_bytes / self.bandwidth_Bps < self.descriptor_s


# One H100, both NIXL buffers on the GPU (UCX CUDA transports): 8 GiB ran at 1,141 GB/s as one
# descriptor and at 151 GB/s as 4,000 (issue 10). Solving 8 GiB / B + n * c for n = 1 and 4,000:
# c = (t_4000 - t_1) / 3999 = 12.3 us, B = 1,143 GB/s. Fitted at 2 MiB per descriptor.
GPU_LOCAL = LinkCost(bandwidth_Bps=1143e9, descriptor_s=12.3e-6)

# Two H200s over NVLink (NV18): NIXL READ of 16 GiB at 384 GB/s (shared/research/gpu.md, 2026-11-29).
# The per-descriptor time is UCX's CUDA path, not the link's: GPU_LOCAL's 12.3 us. The same notes
# also saw 1 GiB in 400 descriptors at 329 GB/s against 349 in one (0.5 us each), so this figure
# is the pessimistic end of what was measured.
NVLINK = LinkCost(bandwidth_Bps=384e9, descriptor_s=12.3e-6)

# One InfiniBand rail, NIXL/UCX READ with 256 descriptors per transfer (LMCache #4161, in
# shared/research/peers_2026.md section 5): ceiling 12.2 GB/s; 4 KiB descriptors ran at 4.69 GB/s,
# 16 KiB at 11.7 and 64 KiB at 12.1, i.e. a rail needs 16-64 KiB per descriptor to reach its rate.
# Fitted at 4 KiB: c = 4096 / 4.69e9 - 4096 / 12.2e9 = 0.54 us. The model then gives 71 % of the
# rate at 16 KiB and 91 % at 64 KiB (measured 96 % and 99 %) and 1.65 GB/s at 1 KiB (measured 0.72):
# it errs on the costly side for mid-sized descriptors and on the cheap side for tiny ones.
IB_RAIL = LinkCost(bandwidth_Bps=12.2e9, descriptor_s=0.54e-6)

# CPU DRAM through NIXL/UCX between two processes on one host (2 cores, nixl 1.5.1, 2026-11-29):
# `refit-bench transport --sizes 64M,256M --descriptors 16384 --no-baselines --iters 5` gave 5.05 GB/s
# in one descriptor and 3.45 GB/s in 16,384 of 4 KiB (64 MiB), i.e. c = 0.38 us; 256 MiB in 16 KiB
# descriptors gave c = 0.31 us. Fitted at 4 KiB.
CPU_UCX = LinkCost(bandwidth_Bps=5.0e9, descriptor_s=0.38e-6)

# Refits that matter are cross-node RDMA reads: the planner's default link is one InfiniBand rail.
DEFAULT_COST = IB_RAIL

PRESETS: dict[str, LinkCost] = {"gpu-local": GPU_LOCAL, "nvlink": NVLINK, "ib-rail": IB_RAIL, "cpu-ucx": CPU_UCX}


def enclose(strided: Iterable[tuple[int, int, int, int]], *, cost: LinkCost, budget: float, seed: int = 0) -> set[int]:
    """Which strided slices `(key, block_bytes, count, stride)` to read as their enclosing block.

    Read as `count` blocks, a slice costs `count` descriptors; read as the block that encloses them
    (from the first block's start to the last one's end), one descriptor and the bytes between the
    blocks. The cheaper wins, while the unneeded bytes of every enclosing block chosen stay within
    `budget`: the largest saving per unneeded byte first. Equal savings (every expert of a model is
    alike) are taken in an order shuffled by `seed`: engine ranks with different seeds whose budget
    covers only some of them enclose different ones, so the unneeded bytes spread over the trainer
    ranks instead of all landing on the holders of the first few. Returns the keys to enclose.
    """
    rng = random.Random(seed)
    gains = []
    for key, nbytes, count, stride in strided:
        span = (count - 1) * stride + nbytes
        saved = cost.seconds(nbytes=count * nbytes, descriptors=count) - cost.seconds(nbytes=span, descriptors=1)
        if saved > 0 and span > count * nbytes:
            gains.append((-saved / (span - count * nbytes), rng.random(), key, span - count * nbytes))
    gains.sort(key=lambda g: g[:2])
    chosen = set()
    for _, _, key, extra in gains:
        if extra <= budget:
            chosen.add(key)
            budget -= extra
    return chosen


class Priced(Protocol):
    """What `price` needs of a plan (`refit.plan.planner.Plan`)."""

    @property
    def wire_bytes(self) -> int: ...
    @property
    def descriptors(self) -> int: ...


def price(plan: Priced, cost: LinkCost = DEFAULT_COST) -> float:
    """Modelled seconds of one engine rank's pull: every byte it moves and every descriptor it posts."""
    return cost.seconds(nbytes=plan.wire_bytes, descriptors=plan.descriptors)
