"""Agreement of the engine ranks at each step of a refit, over torch.distributed.

Every engine rank of a Megatron inference engine runs its own refit (its own receiver), and the
engine pauses, suspends and resumes only when all its ranks do (Megatron's world barrier). So before
the engine pauses, every rank must know that every other has the same version staged, and after the
install, that every rank installed it: otherwise one rank would pause alone and wait forever, or
the engine would resume with ranks on different versions. One small all-reduce per step answers
both (MAX over `[failed, ok, version, -version]`); no Python object crosses the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from refit.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Agreement:
    """What the ranks reported at one step."""

    any_failed: bool
    all_failed: bool
    min_version: int
    max_version: int

    @property
    def same_version(self) -> bool:
        return self.min_version == self.max_version


class RankAgreement:
    """All-reduces each rank's step outcome over `group` (None: the default group).

    The tensor lives where the group's backend wants it: on `device` for NCCL, on the CPU otherwise.
    Waits are bounded by the process group's own timeout.
    """

    def __init__(self, group: Any = None, *, device: torch.device | str = "cpu") -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("torch.distributed must be initialised: the engine ranks agree on every refit step")
        self._group = group
        backend = str(dist.get_backend(group)).lower()
        self._device = torch.device(device) if "nccl" in backend else torch.device("cpu")
        if "nccl" in backend and self._device.type != "cuda":
            raise ConfigError(f"an NCCL group needs a CUDA device for the agreement, got {self._device}")
        self.size = dist.get_world_size(group)

    def exchange(self, *, failed: bool, version: int = -1) -> Agreement:
        """Every rank's outcome of one step (`version` -1 when it has none, e.g. after a failure)."""
        import torch.distributed as dist

        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)  # the calling thread's device: refits may run off the main thread
        ok = not failed
        mine = [int(failed), int(ok), version if ok else -(2**62), -version if ok else -(2**62)]
        t = torch.tensor(mine, dtype=torch.int64, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        any_failed, any_ok, vmax, neg_vmin = (int(x) for x in t.cpu().tolist())
        return Agreement(
            any_failed=bool(any_failed),
            all_failed=not any_ok,
            min_version=-neg_vmin if any_ok else -1,
            max_version=vmax if any_ok else -1,
        )


__all__ = ["Agreement", "RankAgreement"]
