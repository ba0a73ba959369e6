from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_QKV_COLUMN: _ClassVar[Role]
    ROLE_GATED_MLP_COLUMN: _ClassVar[Role]
    ROLE_COLUMN: _ClassVar[Role]
    ROLE_ROW: _ClassVar[Role]
    ROLE_VOCAB_PARALLEL: _ClassVar[Role]
    ROLE_REPLICATED: _ClassVar[Role]
    ROLE_EXPERT_GATED_COLUMN: _ClassVar[Role]
    ROLE_EXPERT_COLUMN: _ClassVar[Role]
    ROLE_EXPERT_ROW: _ClassVar[Role]
    ROLE_EXPERT_REPLICATED: _ClassVar[Role]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_STAGING: _ClassVar[VersionState]
    VERSION_STATE_READY: _ClassVar[VersionState]
    VERSION_STATE_RETIRED: _ClassVar[VersionState]
    VERSION_STATE_FAILED: _ClassVar[VersionState]
ROLE_UNSPECIFIED: Role
ROLE_QKV_COLUMN: Role
ROLE_GATED_MLP_COLUMN: Role
ROLE_COLUMN: Role
ROLE_ROW: Role
ROLE_VOCAB_PARALLEL: Role
ROLE_REPLICATED: Role
ROLE_EXPERT_GATED_COLUMN: Role
ROLE_EXPERT_COLUMN: Role
ROLE_EXPERT_ROW: Role
ROLE_EXPERT_REPLICATED: Role
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_STAGING: VersionState
VERSION_STATE_READY: VersionState
VERSION_STATE_RETIRED: VersionState
VERSION_STATE_FAILED: VersionState

class ParallelCoords(_message.Message):
    __slots__ = ("tp_rank", "tp_size", "pp_rank", "pp_size", "ep_rank", "ep_size", "dp_rank", "dp_size", "etp_rank", "etp_size", "edp_rank", "edp_size")
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    PP_RANK_FIELD_NUMBER: _ClassVar[int]
    PP_SIZE_FIELD_NUMBER: _ClassVar[int]
    EP_RANK_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ETP_RANK_FIELD_NUMBER: _ClassVar[int]
    ETP_SIZE_FIELD_NUMBER: _ClassVar[int]
    EDP_RANK_FIELD_NUMBER: _ClassVar[int]
    EDP_SIZE_FIELD_NUMBER: _ClassVar[int]
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    ep_rank: int
    ep_size: int
    dp_rank: int
    dp_size: int
    etp_rank: int
    etp_size: int
    edp_rank: int
    edp_size: int
    def __init__(self, tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., pp_rank: _Optional[int] = ..., pp_size: _Optional[int] = ..., ep_rank: _Optional[int] = ..., ep_size: _Optional[int] = ..., dp_rank: _Optional[int] = ..., dp_size: _Optional[int] = ..., etp_rank: _Optional[int] = ..., etp_size: _Optional[int] = ..., edp_rank: _Optional[int] = ..., edp_size: _Optional[int] = ...) -> None: ...

class ModelMeta(_message.Message):
    __slots__ = ("architecture", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size", "padded_vocab_size", "vocab_size", "tied_embeddings", "qkv_bias", "qk_layernorm", "gated_linear_unit", "num_experts", "moe_ffn_hidden_size", "params_dtype", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERY_GROUPS_FIELD_NUMBER: _ClassVar[int]
    KV_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    FFN_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    PADDED_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIED_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    QKV_BIAS_FIELD_NUMBER: _ClassVar[int]
    QK_LAYERNORM_FIELD_NUMBER: _ClassVar[int]
    GATED_LINEAR_UNIT_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MOE_FFN_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    Q_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    KV_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    QK_NOPE_HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    QK_ROPE_HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    V_HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    padded_vocab_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    gated_linear_unit: bool
    num_experts: int
    moe_ffn_hidden_size: int
    params_dtype: str
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    def __init__(self, architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_query_groups: _Optional[int] = ..., kv_channels: _Optional[int] = ..., ffn_hidden_size: _Optional[int] = ..., padded_vocab_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., tied_embeddings: _Optional[bool] = ..., qkv_bias: _Optional[bool] = ..., qk_layernorm: _Optional[bool] = ..., gated_linear_unit: _Optional[bool] = ..., num_experts: _Optional[int] = ..., moe_ffn_hidden_size: _Optional[int] = ..., params_dtype: _Optional[str] = ..., q_lora_rank: _Optional[int] = ..., kv_lora_rank: _Optional[int] = ..., qk_nope_head_dim: _Optional[int] = ..., qk_rope_head_dim: _Optional[int] = ..., v_head_dim: _Optional[int] = ...) -> None: ...

class TensorDesc(_message.Message):
    __slots__ = ("name", "role", "dtype", "local_shape", "global_shape", "partition_dim", "partition_stride", "offset", "region", "byte_offset", "digest_block")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SHAPE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_DIM_FIELD_NUMBER: _ClassVar[int]
    PARTITION_STRIDE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    BYTE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DIGEST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: Role
    dtype: str
    local_shape: _containers.RepeatedScalarFieldContainer[int]
    global_shape: _containers.RepeatedScalarFieldContainer[int]
    partition_dim: int
    partition_stride: int
    offset: int
    region: int
    byte_offset: int
    digest_block: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., dtype: _Optional[str] = ..., local_shape: _Optional[_Iterable[int]] = ..., global_shape: _Optional[_Iterable[int]] = ..., partition_dim: _Optional[int] = ..., partition_stride: _Optional[int] = ..., offset: _Optional[int] = ..., region: _Optional[int] = ..., byte_offset: _Optional[int] = ..., digest_block: _Optional[int] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("index", "addr", "nbytes", "device", "device_id", "ipc_handle", "ipc_offset")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    IPC_OFFSET_FIELD_NUMBER: _ClassVar[int]
    index: int
    addr: int
    nbytes: int
    device: str
    device_id: int
    ipc_handle: bytes
    ipc_offset: int
    def __init__(self, index: _Optional[int] = ..., addr: _Optional[int] = ..., nbytes: _Optional[int] = ..., device: _Optional[str] = ..., device_id: _Optional[int] = ..., ipc_handle: _Optional[bytes] = ..., ipc_offset: _Optional[int] = ...) -> None: ...

class SourceRecord(_message.Message):
    __slots__ = ("rank", "coords", "agent_name", "agent_metadata", "regions", "tensors", "digests", "fence_addr", "host", "fence_shm")
    RANK_FIELD_NUMBER: _ClassVar[int]
    COORDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    FENCE_ADDR_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    FENCE_SHM_FIELD_NUMBER: _ClassVar[int]
    rank: int
    coords: ParallelCoords
    agent_name: str
    agent_metadata: bytes
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDesc]
    digests: DigestSet
    fence_addr: int
    host: str
    fence_shm: str
    def __init__(self, rank: _Optional[int] = ..., coords: _Optional[_Union[ParallelCoords, _Mapping]] = ..., agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorDesc, _Mapping]]] = ..., digests: _Optional[_Union[DigestSet, _Mapping]] = ..., fence_addr: _Optional[int] = ..., host: _Optional[str] = ..., fence_shm: _Optional[str] = ...) -> None: ...

class DigestSet(_message.Message):
    __slots__ = ("algorithm", "values")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    values: bytes
    def __init__(self, algorithm: _Optional[str] = ..., values: _Optional[bytes] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("name", "version", "state", "world_size", "published_ranks", "model", "created_at", "ready_at", "dead_ranks", "failure")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_RANKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    READY_AT_FIELD_NUMBER: _ClassVar[int]
    DEAD_RANKS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: VersionState
    world_size: int
    published_ranks: _containers.RepeatedScalarFieldContainer[int]
    model: ModelMeta
    created_at: float
    ready_at: float
    dead_ranks: _containers.RepeatedScalarFieldContainer[int]
    failure: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., world_size: _Optional[int] = ..., published_ranks: _Optional[_Iterable[int]] = ..., model: _Optional[_Union[ModelMeta, _Mapping]] = ..., created_at: _Optional[float] = ..., ready_at: _Optional[float] = ..., dead_ranks: _Optional[_Iterable[int]] = ..., failure: _Optional[str] = ...) -> None: ...

class Claim(_message.Message):
    __slots__ = ("name", "rank", "agent_name", "claimed_at", "lease_s", "lease_expires_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    agent_name: str
    claimed_at: float
    lease_s: float
    lease_expires_at: float
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., agent_name: _Optional[str] = ..., claimed_at: _Optional[float] = ..., lease_s: _Optional[float] = ..., lease_expires_at: _Optional[float] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("name", "rank", "agent_name", "takeover", "lease_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    TAKEOVER_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    agent_name: str
    takeover: bool
    lease_s: float
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., agent_name: _Optional[str] = ..., takeover: _Optional[bool] = ..., lease_s: _Optional[float] = ...) -> None: ...

class ClaimResponse(_message.Message):
    __slots__ = ("claim",)
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    claim: Claim
    def __init__(self, claim: _Optional[_Union[Claim, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("name", "rank", "agent_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    agent_name: str
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., agent_name: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("name", "rank", "agent_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    agent_name: str
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., agent_name: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("claim",)
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    claim: Claim
    def __init__(self, claim: _Optional[_Union[Claim, _Mapping]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("name", "version", "world_size", "model", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    world_size: int
    model: ModelMeta
    source: SourceRecord
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., world_size: _Optional[int] = ..., model: _Optional[_Union[ModelMeta, _Mapping]] = ..., source: _Optional[_Union[SourceRecord, _Mapping]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: VersionInfo
    def __init__(self, info: _Optional[_Union[VersionInfo, _Mapping]] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetVersionResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: VersionInfo
    def __init__(self, info: _Optional[_Union[VersionInfo, _Mapping]] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetStateResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: VersionState
    def __init__(self, state: _Optional[_Union[VersionState, str]] = ...) -> None: ...

class LatestRequest(_message.Message):
    __slots__ = ("name", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: VersionState
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[VersionState, str]] = ...) -> None: ...

class LatestResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: VersionInfo
    def __init__(self, info: _Optional[_Union[VersionInfo, _Mapping]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class GetSourcesRequest(_message.Message):
    __slots__ = ("name", "version", "ranks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class GetSourcesResponse(_message.Message):
    __slots__ = ("sources",)
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedCompositeFieldContainer[SourceRecord]
    def __init__(self, sources: _Optional[_Iterable[_Union[SourceRecord, _Mapping]]] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("name", "version", "known_layout", "ranks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KNOWN_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    known_layout: str
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., known_layout: _Optional[str] = ..., ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("info", "sources", "layout_digest", "tensors_omitted")
    INFO_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TENSORS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    info: VersionInfo
    sources: _containers.RepeatedCompositeFieldContainer[SourceRecord]
    layout_digest: str
    tensors_omitted: bool
    def __init__(self, info: _Optional[_Union[VersionInfo, _Mapping]] = ..., sources: _Optional[_Iterable[_Union[SourceRecord, _Mapping]]] = ..., layout_digest: _Optional[str] = ..., tensors_omitted: _Optional[bool] = ...) -> None: ...

class RetireRequest(_message.Message):
    __slots__ = ("name", "version", "and_older")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AND_OLDER_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    and_older: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., and_older: _Optional[bool] = ...) -> None: ...

class RetireResponse(_message.Message):
    __slots__ = ("retired",)
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    retired: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, retired: _Optional[_Iterable[int]] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
