"""The trainer hook: `Publisher.stream_weights()` publishes this rank's native shards as a version.

Each trainer rank publishes only what it holds (no gather across ranks, no copy of the model in
the default mode): descriptors of its shards, its NIXL agent metadata and its registered regions.

Version safety. By default (`snapshots=0`) receivers read the live parameters. Version `v` stays
readable until this rank calls `invalidate()` (automatically before every optimizer step when the
optimizer is passed in) or publishes a newer version; either retires `v` *before* any weight
changes: first in the rank's version word (`refit.trainer.fence`, which receivers read over NIXL, or
from its shared page on the same host, after their pull), then in the catalog. Receivers check,
after their last byte landed, that the version was not retired, so a pull that raced with an
optimizer step is discarded, never installed torn. With `snapshots=k` each version is copied into
one of `k` registered slots, used round-robin (a new version takes the slot of the oldest), so the
last `k` versions stay readable while training goes on; a slot's old version is retired before the
slot is overwritten, and the copy has landed (on GPU too) before the new version is published.

Megatron DDP with the distributed optimizer and `overlap_param_gather`: a step updates only the
rank's own shard of each bf16 param buffer and leaves the all-gather of the rest to the next
forward's pre-hooks. `stream_weights` completes that all-gather first (a collective over the
data-parallel group, after the previous version is retired), so the version holds exactly the
weights the next forward uses, and that forward does not gather again. With virtual pipeline
chunks (a list of models, each in its own DDP) it does so for every chunk, in list order.

Column blocks (`row_blocks=k`). A row-parallel shard (split on an inner dim: row-parallel weights,
attention `linear_proj`, MoE expert `linear_fc2`) is published as `k` contiguous column blocks, each
its own descriptor (`refit.trainer.blocks`), so an engine at a higher TP reads its columns in one
descriptor instead of one per row. With snapshots the slots hold the blocked layout (no extra
memory); live, those tensors are copied into a registered mirror after the previous version is
retired and before the new one is published: a copy of the rank's row-parallel tensors in memory,
and one copy of them per version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from refit import digest
from refit.catalog.client import CatalogClient
from refit.compat import megatron as mcore
from refit.config import DEFAULT_TIMEOUTS, check_lease
from refit.dtypes import dtype_name
from refit.errors import ConfigError, RefitError, VersionNotFoundError
from refit.megatron.model import (
    LocalParam,
    ddp_wrappers,
    local_parameters,
    model_chunks,
    model_meta,
    parallel_coords,
)
from refit.trainer import blocks as column_blocks
from refit.trainer import memory
from refit.trainer.fence import VersionWords
from refit.trainer.lease import Lease
from refit.transport.cuda_ipc import Exports
from refit.transport.nixl import NixlAgent
from refit.types import DigestSet, Region, SourceRecord, TensorDesc, VersionInfo

logger = logging.getLogger(__name__)

# More distinct storages than this and a bare model is moved into one arena per device.
MAX_STORAGE_REGIONS = 16


class Publisher:
    """Publishes one trainer rank's shards of a Megatron-Core GPTModel to a refit catalog.

    Args:
        catalog: the catalog's "host:port".
        model: a GPTModel (possibly DDP/Float16Module-wrapped) or the list of its virtual-pipeline chunks.
        name: the model's name in the catalog (several models can share one catalog).
        architecture: HF family ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "qwen2_moe", ...);
            inferred from the config when omitted.
        vocab_size: the true (unpadded) vocabulary, when Megatron padded it; 0 leaves it to the engine.
        snapshots: 0 publishes live parameters; k > 0 keeps the last k versions readable in copies.
        row_blocks: k > 1 publishes each row-parallel shard as k contiguous column blocks (the
            largest divisor of its width <= k), so an engine at up to k times the trainer's TP reads
            each slice in one descriptor instead of one per row (DeepSeek-V3's expert fc2 at engine
            TP32: 7,168 descriptors per slice). Costs, with snapshots=0, a registered copy of those
            tensors (logged at info level) refreshed by every stream_weights; in snapshot slots the
            blocked layout costs nothing extra. 1 (the default) publishes every tensor as it is.
        optimizer: a torch or Megatron optimizer; with snapshots=0, each step first retires the version.
        takeover: claim this rank even if another publisher holds it (after a crash, say).
        lease_s: the claim is a lease of this many seconds, renewed by heartbeats on a daemon thread:
            if this process dies or stalls longer, the catalog fails its STAGING versions and marks
            the rank dead in its READY ones (receivers read those tensors from a DP/EDP replica, or
            fail naming the rank). 0: no lease (the claim lasts until released).
        heartbeat_s: the heartbeat interval (default: `lease_s` / 6; at most `lease_s` / 2).
        consolidate: allow moving a bare model's parameters into one arena per device.
        timeout_s: deadline of every catalog call.
        token: the catalog's trainer token (None: `$REFIT_CATALOG_TOKEN`, else none); never logged.
        tls_ca, tls_cert, tls_key: PEM files for a catalog served over TLS: the CA that signed its
            certificate, and this client's certificate and key where the catalog requires mutual TLS
            (as `CatalogClient`).
        cuda_ipc: publish each GPU region's CUDA IPC handle, so receivers on this host copy from it
            themselves instead of over NIXL (`refit.transport.cuda_ipc`).

    Raises:
        ConfigError: bad arguments or uninitialised torch.distributed / parallel_state.
        RankTakenError: another publisher holds this rank of `name`.
        CatalogUnavailableError: the catalog cannot be reached.
    """

    def __init__(
        self,
        *,
        catalog: str,
        model: nn.Module | Sequence[nn.Module],
        name: str = "default",
        architecture: str | None = None,
        vocab_size: int = 0,
        snapshots: int = 0,
        row_blocks: int = 1,
        optimizer: Any = None,
        takeover: bool = False,
        consolidate: bool = True,
        timeout_s: float = DEFAULT_TIMEOUTS.catalog_s,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        lease_s: float = DEFAULT_TIMEOUTS.lease_s,
        heartbeat_s: float | None = None,
        cuda_ipc: bool = True,
    ) -> None:
        if snapshots < 0:
            raise ConfigError(f"snapshots must be >= 0, got {snapshots}")
        column_blocks.check_requested(row_blocks)
        if not name:
            raise ConfigError("name must be non-empty")
        if heartbeat_s is None:
            heartbeat_s = lease_s * DEFAULT_TIMEOUTS.heartbeat_s / DEFAULT_TIMEOUTS.lease_s
        if lease_s:
            check_lease(lease_s, heartbeat_s)
        elif lease_s != 0:
            raise ConfigError(f"lease_s must be > 0 (or 0: no lease), got {lease_s!r}")
        chunks = model_chunks(model)
        ddps = ddp_wrappers(model)
        # DDP chunks whose distributed optimizer leaves the param all-gather to the next forward.
        self._deferred_gathers = [d for d in ddps if mcore.defers_param_gather(d)]
        self._in_ddp = bool(ddps)
        self.rank, self.world_size, self.coords = parallel_coords()
        self.name = name
        self.model_meta = model_meta(chunks, architecture=architecture, vocab_size=vocab_size)
        self._params: list[LocalParam] = local_parameters(chunks, self.coords)
        # Per parameter: its column-block layout, or None when it is published as it is.
        self._layouts = [
            column_blocks.layout_for(shape=tuple(p.param.shape), partition_dim=p.partition_dim,
                                     partition_stride=p.partition_stride, requested=row_blocks)
            for p in self._params
        ]  # fmt: skip
        self._snapshots = snapshots
        self._client = CatalogClient(
            catalog, timeout_s=timeout_s, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        self._agent: NixlAgent | None = None
        self._current: int | None = None
        self._last: int | None = None
        self._ring: memory.SnapshotRing | None = None
        self._mirror: memory.BlockedMirror | None = None
        self._mirrored: dict[int, int] = {}  # parameter index -> its index in the mirror
        self._words: VersionWords | None = None  # one per place published from: the live params or each slot
        self._hooks: list[Any] = []
        self._lease: Lease | None = None
        self._exports = Exports(enabled=cuda_ipc)
        self.last_digest_seconds = 0.0  # seconds the last stream_weights spent computing digests
        try:
            self._agent = NixlAgent(prefix=f"refit-trainer-{name}-r{self.rank}")
            if lease_s:
                self._lease = Lease(self._client, name=name, rank=self.rank, agent_name=self._agent.name,
                                    lease_s=lease_s, heartbeat_s=heartbeat_s)  # fmt: skip
                self._lease.claim(takeover=takeover)
            else:
                self._client.claim(name=name, rank=self.rank, agent_name=self._agent.name, takeover=takeover)
            self._setup_memory(consolidate)
        except BaseException:
            self.close(release=False)
            raise
        if optimizer is not None:
            self._hook_optimizer(optimizer)

    # -- memory ----------------------------------------------------------------------------------

    def _setup_memory(self, consolidate: bool) -> None:
        tensors = [p.param for p in self._params]
        blocks = memory.storage_blocks(tensors)
        # DDP parameters are views of its param buffers: moving them would detach them from DDP.
        if consolidate and not self._in_ddp and self._snapshots == 0 and len(blocks) > MAX_STORAGE_REGIONS:
            blocks = memory.consolidate(tensors)
        self._live_blocks = blocks
        blocked = [i for i, layout in enumerate(self._layouts) if layout is not None]
        if self._snapshots:
            self._ring = memory.SnapshotRing(tensors, self._snapshots, layouts=self._layouts)
        elif blocked:
            self._mirror = memory.BlockedMirror([tensors[i] for i in blocked], [self._layouts[i] for i in blocked])
            self._mirrored = {i: j for j, i in enumerate(blocked)}
        if blocked:
            logger.info(
                "rank %d: %d row-parallel tensors published as column blocks; %d extra bytes (%s)",
                self.rank,
                len(blocked),
                self._mirror.nbytes if self._mirror is not None else 0,
                "a live mirror" if self._mirror is not None else "stored blocked in the snapshot slots",
            )
        for block in self._blocks():
            self._agent.register(block.addr, block.nbytes, device=block.device, device_id=block.device_id)
        self._words = VersionWords(self._agent, max(self._snapshots, 1))
        nbytes = sum(p.param.numel() * p.param.element_size() for p in self._params)
        logger.info("rank %d: %d tensors, %d bytes, %d registered region(s)", self.rank, len(self._params), nbytes,
                    len(self._blocks()))  # fmt: skip

    def _blocks(self) -> list[memory.Block]:
        if self._ring is not None:
            return self._ring.blocks
        return self._live_blocks + (self._mirror.blocks if self._mirror is not None else [])

    @property
    def extra_bytes(self) -> int:
        """Memory this publisher holds besides the parameters: snapshot slots and the column-block mirror."""
        if self._ring is not None:
            return sum(b.nbytes for b in self._ring.blocks)
        return self._mirror.nbytes if self._mirror is not None else 0

    def _refresh_live_blocks(self) -> None:
        """Re-register if the parameters moved since registration (an offload, a re-allocation)."""
        if all(any(b.holds(p.param) for b in self._live_blocks) for p in self._params):
            return
        logger.warning("rank %d: parameters moved since registration; registering again", self.rank)
        for b in self._live_blocks:
            self._agent.deregister(b.addr, b.nbytes, device=b.device, device_id=b.device_id)
        self._live_blocks = memory.storage_blocks([p.param for p in self._params])
        for b in self._live_blocks:
            self._agent.register(b.addr, b.nbytes, device=b.device, device_id=b.device_id)

    @property
    def lease(self) -> Lease | None:
        """This rank's lease (None without one): `lapses` counts the times the catalog declared it dead."""
        return self._lease

    @property
    def num_registrations(self) -> int:
        """NIXL registrations made by this publisher so far (constant across versions)."""
        return self._agent.num_registrations if self._agent else 0

    # -- publishing ------------------------------------------------------------------------------

    def _describe(self, blocks: list[memory.Block], locate: Any) -> tuple[list[Region], list[TensorDesc], DigestSet]:
        """Regions, descriptors and their digests; `locate(i)` is (region, byte offset) of parameter i
        (blocked bytes if blocked). The digests are computed on the published bytes, on their device."""
        regions = self._exports.regions([b.region(i) for i, b in enumerate(blocks)])
        descs: list[TensorDesc] = []
        for i, (p, layout) in enumerate(zip(self._params, self._layouts, strict=True)):
            region, byte_offset = locate(i)
            whole = TensorDesc(
                name=p.name,
                role=p.role,
                dtype=dtype_name(p.param.dtype),
                local_shape=tuple(p.param.shape),
                global_shape=p.global_shape,
                partition_dim=p.partition_dim,
                partition_stride=p.partition_stride,
                offset=p.offset,
                region=region,
                byte_offset=byte_offset,
            )
            parts = column_blocks.split(whole, layout.count) if layout is not None else (whole,)
            descs.extend(digest.with_blocks(d) for d in parts)
        t0 = time.perf_counter()
        views = memory.byte_views(blocks, [p.param for p in self._params])
        digests = digest.pack([digest.shard_digests(views[d.region], d) for d in descs])
        self.last_digest_seconds = time.perf_counter() - t0
        return regions, descs, digests

    def _live_layout(self) -> tuple[list[Region], list[TensorDesc], DigestSet]:
        self._refresh_live_blocks()
        live, mirror = self._live_blocks, self._mirror

        def locate(i: int) -> tuple[int, int]:
            if mirror is not None and i in self._mirrored:  # published from the blocked copy
                j = self._mirrored[i]
                return len(live) + mirror.block_index[j], mirror.offsets[j]
            param = self._params[i].param
            index = next(k for k, b in enumerate(live) if b.holds(param))
            return index, param.data_ptr() - live[index].addr

        return self._describe(self._blocks(), locate)

    def _retire_snapshot(self, version: int) -> None:
        """Retire a snapshot version before its slot is overwritten (or the slots are released)."""
        try:
            self._client.retire(name=self.name, version=version)
        except VersionNotFoundError:
            # Its publish never reached the catalog, so no reader can know of it.
            logger.debug("rank %d: snapshot version %d was never published", self.rank, version)

    def _snapshot_layout(
        self, ring: memory.SnapshotRing, version: int
    ) -> tuple[list[Region], list[TensorDesc], DigestSet]:
        # The slot's old version is retired before the copy (its word first), so a reader of it
        # discards what it pulled.
        self._words.retire(ring.next_slot())
        slot = ring.write(version, self._retire_snapshot)
        self._words.publish(slot, version)  # the copy has landed
        places = list(zip(ring.block_index, ring.offsets, strict=True))
        return self._describe(ring.slot_blocks(slot), places.__getitem__)

    def stream_weights(self, version: int) -> VersionInfo:
        """Publish this rank's part of `version`; the version is READY once every rank has published.

        Versions must increase. Returns the version as the catalog holds it after this rank's part.
        """
        if not isinstance(version, int) or version < 0:
            raise ConfigError(f"version must be a non-negative int, got {version!r}")
        if self._last is not None and version <= self._last:
            raise ConfigError(f"version {version} is not newer than the last published version {self._last}")
        start = time.perf_counter()
        if self._lease is not None:
            self._lease.ensure()  # a lapsed lease is claimed again before the rank publishes anew
        if self._ring is None:
            self.invalidate()  # before the all-gather below writes the live parameters
        for ddp in self._deferred_gathers:  # the bytes the next forward would use, gathered now
            mcore.gather_params(ddp)
        memory.synchronize([p.param for p in self._params])  # the optimizer's writes land before anyone reads
        if self._ring is not None:
            regions, descs, digests = self._snapshot_layout(self._ring, version)
        else:
            if self._mirror is not None:  # the old version is retired: its blocked copy may change now
                self._mirror.refresh()
            regions, descs, digests = self._live_layout()
            self._words.publish(0, version)  # the optimizer's writes and the mirror have landed
        source = SourceRecord(
            rank=self.rank,
            coords=self.coords,
            agent_name=self._agent.name,
            agent_metadata=self._agent.metadata(),
            regions=tuple(regions),
            tensors=tuple(descs),
            digests=digests,
            fence_addr=self._words.addr(self._ring.slot_of(version) if self._ring is not None else 0),
            host=self._exports.host,
            fence_shm=self._words.shm_name,
        )
        info = self._client.publish(
            name=self.name, version=version, world_size=self.world_size, model=self.model_meta, source=source
        )
        self._last = version
        self._current = None if self._snapshots else version
        logger.info("rank %d published %s v%d (%d tensors) in %.3fs; state %s", self.rank, self.name, version,
                    len(descs), time.perf_counter() - start, info.state.value)  # fmt: skip
        return info

    def invalidate(self) -> list[int]:
        """Retire the live version before the weights change (no-op in snapshot mode)."""
        if self._snapshots or self._current is None:
            return []
        self._words.retire(0)  # before the catalog hears of it: receivers read the word, not the catalog
        retired = self._client.retire(name=self.name, version=self._current, and_older=True)
        self._current = None
        return retired

    def _hook_optimizer(self, optimizer: Any) -> None:
        """Retire the live version before every optimizer step (torch or Megatron optimizers)."""
        found = mcore.torch_optimizers(optimizer)
        if not found:
            raise ConfigError(f"cannot find a torch optimizer inside {type(optimizer).__name__}")

        def before_step(*_: object) -> None:  # a step pre-hook must return None
            self.invalidate()

        for opt in found:
            self._hooks.append(opt.register_step_pre_hook(before_step))

    # -- life cycle ------------------------------------------------------------------------------

    def close(self, *, release: bool = True) -> None:
        """Give up the rank claim and the NIXL registrations; published versions become unreadable."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._lease is not None:
            self._lease.stop()
        if self._agent is not None:
            if release:
                try:
                    self.invalidate()
                    for version in self._ring.drain() if self._ring is not None else []:
                        self._retire_snapshot(version)
                    self._client.release(name=self.name, rank=self.rank, agent_name=self._agent.name)
                except RefitError:  # closing must not fail because the catalog went away first
                    logger.warning("rank %d: could not release its claim", self.rank, exc_info=True)
            if self._words is not None:
                self._words.close()
            self._agent.close()
            self._agent = None
        self._client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
