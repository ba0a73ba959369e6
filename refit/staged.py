"""What a receiver's fetch hands to its install (`StagedVersion`), and a receiver's staging figures
(`ReceiverStats`): values of `refit.staging` and `refit.receiver`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from refit.plan.records import Plan
from refit.plan.verify import Verifier
from refit.types import SourceRecord, UpdateResult


@dataclass(kw_only=True)
class StagedVersion:
    """A version pulled (or, streamed, begun) and ready to install (valid until the next fetch).

    `tensors` is the complete set when the version is installed whole; a streamed version holds its
    first chunks in staging (`pulled` of them) and pulls the rest during `install`.
    """

    version: int
    tensors: dict[str, torch.Tensor]
    bytes: int
    num_sources: int
    num_descriptors: int
    staging_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    generation: int = 0
    streamed: bool = False
    pulled: int = 0
    plan: Plan | None = field(default=None, repr=False)
    sources: tuple[SourceRecord, ...] = field(default=(), repr=False)
    verifier: Verifier | None = field(default=None, repr=False)  # None: digests not checked
    # A version pulled ahead of the catalog's answer (`refit.ahead`): checks that answer once the last
    # byte has landed, before the re-check; None: the version came from the catalog.
    confirm: Callable[[], None] | None = field(default=None, repr=False)
    # The trainers' regions mapped on this GPU that the install copies the chunks out of, instead of
    # staging them (`refit.staging.StagingPool.mapped_regions`); None: chunks are staged.
    mapped: Mapping[tuple[int, int], torch.Tensor] | None = field(default=None, repr=False)

    def result(self, timings: dict[str, float], descriptors: int) -> UpdateResult:
        """What installing this version did, with the install's `timings` and all `descriptors` posted."""
        plan = self.plan
        return UpdateResult(
            version=self.version,
            bytes=self.bytes,
            seconds=sum(timings.values()),
            num_tensors=len(plan.targets) if plan is not None else len(self.tensors),
            num_sources=self.num_sources,
            num_descriptors=descriptors,
            staging_bytes=self.staging_bytes,
            direct_bytes=plan.direct_bytes if plan is not None else 0,
            chunks=max(len(plan.chunks), 1) if plan is not None else 1,
            wire_seconds=timings["wire"],
            install_seconds=timings["install"],
            timings=timings,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiverStats:
    """A receiver's staging, at one moment.

    Attributes:
        registrations: buffers and engine storages registered with NIXL so far (constant while reused).
        staging_bytes: size of the current staging buffers (0: none allocated, or set aside).
        peak_staging_bytes: the most staging held at once so far.
        quarantined: staging buffers set aside after a failed or timed-out read, so far; the next
            fetch pulls into fresh buffers.
        quarantined_bytes: bytes of those still held because a read into them may still be running.
        verified_bytes: bytes checked against their trainer's digests so far (whole blocks).
        unverified_bytes: bytes pulled so far that no digest check covered (blocks read in part, or
            trainers that publish no digests; 0 when every byte was verified).
        verify_seconds: seconds spent checking digests so far.
        ahead: refits pulled ahead of the catalog's answer, from the trainers' version words
            (`refit.ahead`), so far.
        ahead_missed: of those, the ones the catalog's answer did not confirm (pulled again through it).
        ipc_copies: copies this process enqueued itself, over CUDA IPC, from trainer ranks on its host
            (`refit.transport.cuda_ipc`), so far; their bytes did not go through NIXL.
        shared_words: trainers' version words read from their shared pages on this host
            (`refit.transport.host`) instead of over NIXL, so far.
        mapped_chunks: staged chunks copied straight out of the trainers' memory mapped on the
            engine's GPU instead of through staging (`Receiver.mapped_install`), so far.
        checked_copies: batches of direct reads copied by kernels out of the trainers' memory mapped
            on the engine's GPU, digested in the same pass (`refit.plan.checked_copy`), so far.
    """

    registrations: int
    staging_bytes: int
    peak_staging_bytes: int
    quarantined: int
    quarantined_bytes: int
    verified_bytes: int = 0
    unverified_bytes: int = 0
    verify_seconds: float = 0.0
    ahead: int = 0
    ahead_missed: int = 0
    ipc_copies: int = 0
    shared_words: int = 0
    mapped_chunks: int = 0
    checked_copies: int = 0
