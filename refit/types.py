"""Plain values shared by every layer: roles, descriptors, sources, versions, model metadata.

Everything here is a frozen, keyword-only dataclass or a `str` enum. Nothing here imports torch,
gRPC or NIXL, so the catalog server, the planner and the hooks can all depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from refit.dtypes import DTYPE_SIZES
from refit.errors import ConfigError


class Role(StrEnum):
    """How a Megatron parameter is split across tensor-parallel ranks."""

    QKV_COLUMN = "qkv_column"  # fused QKV, interleaved per query group, split on dim 0
    GATED_MLP_COLUMN = "gated_mlp_column"  # [gate_r; up_r] per rank (partition stride 2), dim 0
    COLUMN = "column"  # plain column-parallel, dim 0
    ROW = "row"  # row-parallel, dim 1
    VOCAB_PARALLEL = "vocab_parallel"  # embedding / output layer rows, padded vocab, dim 0
    REPLICATED = "replicated"  # identical on every TP rank (norms, row-parallel biases)
    # MoE experts: one global tensor per expert (its global index in the name), held by the expert-parallel
    # rank that owns it, split within the expert by expert TP, and copied on every expert-data-parallel rank.
    EXPERT_GATED_COLUMN = "expert_gated_column"  # expert linear_fc1 of a gated MLP: [gate_r; up_r], dim 0
    EXPERT_COLUMN = "expert_column"  # expert linear_fc1 without gating, dim 0
    EXPERT_ROW = "expert_row"  # expert linear_fc2, dim 1
    EXPERT_REPLICATED = "expert_replicated"  # an expert tensor expert TP does not split (the fc2 bias)

    @property
    def partition_dim(self) -> int:
        """The dimension Megatron-Core splits a tensor of this role on (-1: not split)."""
        if self in (Role.REPLICATED, Role.EXPERT_REPLICATED):
            return -1
        return 1 if self in (Role.ROW, Role.EXPERT_ROW) else 0

    @property
    def partition_stride(self) -> int:
        """Equal parts each shard takes rows of: 2 for a gated fc1 (`[gate_r; up_r]`), else 1."""
        return 2 if self in (Role.GATED_MLP_COLUMN, Role.EXPERT_GATED_COLUMN) else 1


class VersionState(StrEnum):
    """Life cycle of a weight version in the catalog."""

    STAGING = "STAGING"  # some trainer ranks have published, not all
    READY = "READY"  # every rank of the declared world has published
    RETIRED = "RETIRED"  # the bytes may be overwritten; never install from it
    FAILED = "FAILED"  # a trainer rank died (its lease lapsed) before it was READY; never READY


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def _non_negative(name: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelCoords:
    """Where one trainer rank sits in the Megatron parallel layout.

    Dense layers are split by TP and copied on DP replicas. MoE experts are spread over EP, each
    expert split by expert TP (`etp`, independent of TP) and copied on expert-DP (`edp`) replicas.
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    edp_rank: int = 0
    edp_size: int = 1

    def __post_init__(self) -> None:
        for kind in ("tp", "pp", "ep", "dp", "etp", "edp"):
            rank, size = getattr(self, f"{kind}_rank"), getattr(self, f"{kind}_size")
            _positive(f"{kind}_size", size)
            if not 0 <= rank < size:
                raise ConfigError(f"{kind}_rank {rank} outside [0, {size})")


# ModelMeta's multi-latent attention dimensions (0 for any other attention).
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelMeta:
    """What a receiver must know about the trainer's model to plan and validate a refit.

    `vocab_size` is the true vocabulary (0 when the publisher did not declare it; the engine's own
    vocabulary then decides how many rows of the padded tables are real).
    """

    architecture: str  # "llama", "qwen2", "qwen3", ...
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    padded_vocab_size: int
    vocab_size: int = 0
    tied_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    gated_linear_unit: bool = True
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    params_dtype: str = "float32"
    # Multi-latent attention (DeepSeek-V3, Kimi-K2); all 0 for other attention. `q_lora_rank` 0: q is
    # projected straight from the hidden states (`linear_q_proj` / `q_proj`), without a query latent.
    # An MLA model's `num_query_groups` is its head count and its `kv_channels` its `v_head_dim`.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def multi_latent_attention(self) -> bool:
        return self.kv_lora_rank > 0

    def __post_init__(self) -> None:
        if not self.architecture:
            raise ConfigError("architecture must be non-empty")
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "ffn_hidden_size",
            "padded_vocab_size",
        ):
            _positive(name, getattr(self, name))
        _non_negative("vocab_size", self.vocab_size)
        _non_negative("num_experts", self.num_experts)
        for name in MLA_FIELDS:
            _non_negative(name, getattr(self, name))
        if any(getattr(self, name) for name in MLA_FIELDS) and not self.multi_latent_attention:
            raise ConfigError(f"MLA head dims set without a kv_lora_rank: {[getattr(self, n) for n in MLA_FIELDS]}")
        if self.multi_latent_attention:
            for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.vocab_size > self.padded_vocab_size:
            raise ConfigError(f"vocab_size {self.vocab_size} > padded_vocab_size {self.padded_vocab_size}")
        if self.params_dtype not in DTYPE_SIZES:
            raise ConfigError(f"unknown params_dtype {self.params_dtype!r}")


def shard_geometry(
    *, name: str, global_shape: tuple[int, ...], partition_dim: int, partition_stride: int, rank: int, size: int
) -> tuple[tuple[int, ...], int]:
    """(local shape, offset) of TP rank `rank` of `size` of a global tensor, split as Megatron-Core does.

    Along `partition_dim` the tensor is cut into `partition_stride` equal parts and each rank takes
    its `1/size` of every part; `offset` is its first row within a part. The one formula of the
    library: the Megatron reader, the benchmark's synthetic trainers and the tests all use it.
    """
    if partition_dim == -1:
        return tuple(global_shape), 0
    rows = global_shape[partition_dim]
    if size < 1 or not 0 <= rank < size or rows % (size * partition_stride):
        raise ConfigError(
            f"{name}: dim {partition_dim} ({rows} rows, stride {partition_stride}) does not split over {size} ranks"
        )
    local = list(global_shape)
    local[partition_dim] = rows // size
    return tuple(local), rank * local[partition_dim] // partition_stride


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorDesc:
    """One trainer rank's shard of one Megatron parameter, and where its bytes live.

    `name` is the *global* Megatron name (pipeline-local layer numbers already turned global).
    Along `partition_dim` the global tensor is cut into `partition_stride` equal parts; this shard
    holds rows `[offset, offset + local_shape[partition_dim] / partition_stride)` of every part, stored
    part after part. With stride 1 that is simply rows `[offset, offset + local)` of the global tensor.
    Replicated tensors have `partition_dim == -1` and `offset == 0`.
    """

    name: str
    role: Role
    dtype: str
    local_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    partition_dim: int = -1
    partition_stride: int = 1
    offset: int = 0
    region: int = 0
    byte_offset: int = 0
    digest_block: int = 0  # units per digest block (`refit.digest`); 0: no digests

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("tensor name must be non-empty")
        if self.dtype not in DTYPE_SIZES:
            raise ConfigError(f"{self.name}: unknown dtype {self.dtype!r}")
        if len(self.local_shape) != len(self.global_shape):
            raise ConfigError(f"{self.name}: local shape {self.local_shape} vs global {self.global_shape}")
        _positive(f"{self.name}: partition_stride", self.partition_stride)
        _non_negative(f"{self.name}: offset", self.offset)
        _non_negative(f"{self.name}: region", self.region)
        _non_negative(f"{self.name}: byte_offset", self.byte_offset)
        _non_negative(f"{self.name}: digest_block", self.digest_block)
        if self.partition_dim == -1:
            if self.local_shape != self.global_shape:
                raise ConfigError(f"{self.name}: replicated but local {self.local_shape} != global")
            return
        if not 0 <= self.partition_dim < len(self.global_shape):
            raise ConfigError(f"{self.name}: partition_dim {self.partition_dim} out of range")
        d = self.partition_dim
        local, glob, s = self.local_shape[d], self.global_shape[d], self.partition_stride
        if local % s or glob % s or self.offset + local // s > glob // s:
            raise ConfigError(f"{self.name}: shard rows [{self.offset}, +{local}/{s}) do not fit global dim {glob}")

    @classmethod
    def shard(
        cls,
        *,
        name: str,
        role: Role,
        dtype: str,
        global_shape: tuple[int, ...],
        rank: int = 0,
        size: int = 1,
        region: int = 0,
        byte_offset: int = 0,
    ) -> TensorDesc:
        """The descriptor of TP (or expert-TP) rank `rank` of `size`, split as Megatron splits `role`."""
        dim, stride = role.partition_dim, role.partition_stride
        local, offset = shard_geometry(
            name=name, global_shape=global_shape, partition_dim=dim, partition_stride=stride, rank=rank, size=size
        )
        return cls(
            name=name, role=role, dtype=dtype, local_shape=local, global_shape=tuple(global_shape),
            partition_dim=dim, partition_stride=stride, offset=offset, region=region, byte_offset=byte_offset,
        )  # fmt: skip

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


@dataclass(frozen=True, kw_only=True, slots=True)
class Region:
    """A block of memory a trainer rank registered with NIXL once, and reuses for every version."""

    index: int
    addr: int
    nbytes: int
    device: str = "cpu"  # "cpu" or "cuda"
    device_id: int = 0
    # GPU memory only: the CUDA IPC handle of the allocation that holds the region, and the region's
    # offset in it, so a process on the trainer's host can map it and copy out of it itself (b"": none).
    # A capability to map the trainer's memory: kept out of repr, hence out of logs and error messages.
    ipc_handle: bytes = field(default=b"", repr=False)
    ipc_offset: int = 0

    def __post_init__(self) -> None:
        _non_negative("region index", self.index)
        _positive("region nbytes", self.nbytes)
        _non_negative("region ipc_offset", self.ipc_offset)
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"region device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.ipc_handle and (len(self.ipc_handle) != IPC_HANDLE_BYTES or self.device != "cuda"):
            raise ConfigError(
                f"region {self.index}: a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes of GPU memory, got "
                f"{len(self.ipc_handle)} bytes on {self.device!r}"
            )
        if self.ipc_offset and not self.ipc_handle:
            raise ConfigError(f"region {self.index}: ipc_offset without an ipc_handle")


@dataclass(frozen=True, kw_only=True, slots=True)
class DigestSet:
    """Per-block digests of one source record's tensors (`refit.digest`): one little-endian int64 per
    block, tensor after tensor in record order, over the tensors with `digest_block > 0`."""

    algorithm: str = ""  # "": no digests
    values: bytes = b""

    def __post_init__(self) -> None:
        if len(self.values) % 8 or (self.values and not self.algorithm):
            raise ConfigError(f"digest values of {len(self.values)} bytes (algorithm {self.algorithm!r}) are malformed")


WORD_RETIRED = -1  # a version word's value while its bytes change or hold no published version


def have_words(sources: Sequence[SourceRecord]) -> bool:
    """Whether every one of `sources` (at least one) publishes its version word (`fence_addr`)."""
    return bool(sources) and all(s.fence_addr for s in sources)


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceRecord:
    """One trainer rank's part of one version: who it is, how to reach it, and what it holds."""

    rank: int
    coords: ParallelCoords
    agent_name: str
    agent_metadata: bytes
    regions: tuple[Region, ...]
    tensors: tuple[TensorDesc, ...]
    digests: DigestSet = field(default_factory=DigestSet)
    # The rank's version word (`refit.trainer.fence`): the address, in its registered host memory, of
    # an int64 that holds this record's version while its bytes are unchanged (WORD_RETIRED while
    # they change); 0: none.
    fence_addr: int = 0
    # The trainer's host (`refit.transport.host.host_id`): a receiver on the same host may map the
    # regions' CUDA IPC handles, and the page of /dev/shm named `fence_shm` that holds the version word
    # (at `fence_addr`'s offset in its page), instead of reading them over NIXL. "": not given.
    host: str = ""
    fence_shm: str = ""

    def __post_init__(self) -> None:
        _non_negative("rank", self.rank)
        if not 0 <= self.fence_addr < 1 << 64:
            raise ConfigError(f"rank {self.rank}: fence_addr must be a 64-bit address, got {self.fence_addr}")
        if not self.agent_name:
            raise ConfigError("agent_name must be non-empty")
        by_index = {r.index: r for r in self.regions}
        if len(by_index) != len(self.regions):
            raise ConfigError(f"rank {self.rank}: duplicate region indices")
        for t in self.tensors:
            region = by_index.get(t.region)
            if region is None:
                raise ConfigError(f"rank {self.rank}: {t.name} names unknown region {t.region}")
            if t.byte_offset + t.nbytes > region.nbytes:
                raise ConfigError(f"rank {self.rank}: {t.name} runs past the end of region {t.region}")


@dataclass(frozen=True, kw_only=True, slots=True)
class VersionInfo:
    """A weight version as the catalog sees it."""

    name: str
    version: int
    state: VersionState
    world_size: int
    published_ranks: tuple[int, ...]
    model: ModelMeta
    created_at: float = 0.0
    ready_at: float = 0.0
    dead_ranks: tuple[int, ...] = ()  # READY, but these ranks' publishers died: read them elsewhere
    failure: str = ""  # why the version FAILED, or which ranks died

    @property
    def missing_ranks(self) -> tuple[int, ...]:
        have = set(self.published_ranks)
        return tuple(r for r in range(self.world_size) if r not in have)


@dataclass(frozen=True, kw_only=True, slots=True)
class Claim:
    """A publisher's hold on one trainer rank of a named model."""

    name: str
    rank: int
    agent_name: str
    claimed_at: float = 0.0
    lease_s: float = 0.0  # 0: no lease (never lapses)
    lease_expires_at: float = 0.0  # catalog clock; 0 without a lease


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateResult:
    """What one `update_weights()` call did; `timings` has every phase ("plan", "prepare", "wire", ...)."""

    version: int
    bytes: int
    seconds: float
    num_tensors: int = 0
    num_sources: int = 0
    num_descriptors: int = 0
    staging_bytes: int = 0  # staging this refit held at once (buffers are reused across refits)
    direct_bytes: int = 0  # bytes read straight into the engine's memory, bypassing staging
    chunks: int = 1  # staging chunks the refit streamed through (1: staged whole, installed at once)
    wire_seconds: float = 0.0
    install_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.wire_seconds / 1e9 if self.wire_seconds > 0 else 0.0
