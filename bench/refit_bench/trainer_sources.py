"""Trainer sources synthesizer: the SourceRecords a Megatron-Core trainer would publish, without weights.

From a small HF-config-like model JSON (`models/*.json`) and a trainer layout (TP, PP, EP, expert TP,
DP), build one `SourceRecord` per trainer rank exactly as the publisher would: global Megatron names,
roles, TP shards with their offsets and strides, one registered region per rank with the rank's
shards packed back to back. Covered: GQA attention (fused QKV, optional q/k norms), MLA attention
(DeepSeek-V3 / Kimi-K2: replicated down projections, column up projections with fused norms), dense
and gated MLPs, dense-first layers (`first_k_dense_replace`), MoE layers with router (and its
expert bias), shared experts and routed experts (TEGroupedMLP names, one global tensor per expert).

`shard_sources` cuts any list of global tensors into per-rank records; `reader_sources` feeds it the
tensors refit's own Megatron reader finds in a meta-device GPTModel instead (`plan --from-reader`).

Rank order is Megatron's default: dense `tp-cp-ep-dp-pp` (TP fastest) and expert `tp-ep-dp-pp`.
Context parallelism only adds weight copies, so fold it into `dp`.

`TrainerLayout.row_blocks` models `Publisher(row_blocks=k)`: every row-parallel shard (attention
`linear_proj`, dense and shared-expert `linear_fc2`, routed expert `linear_fc2`) is published as its
column blocks (`refit.trainer.blocks`), in the bytes it took before. A live publisher holds those
tensors once more in its mirror: `mirror_bytes` counts them per rank.

Modelling assumption for FP8 anchors: `linear_dtype` sets the dtype of every GEMM weight (attention
projections, dense and expert MLPs; not embeddings, output layer or router), as when the trainer
publishes FP8-quantised copies. Block scales (4 bytes per 128x128 block, 0.02 % of FP8 bytes) are
not modelled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refit.dtypes import DTYPE_SIZES
from refit.errors import ConfigError
from refit.trainer.blocks import blocked_descs, check_requested
from refit.types import ModelMeta, ParallelCoords, Region, Role, SourceRecord, TensorDesc

MODELS_DIR = Path(__file__).parent / "models"
VOCAB_DIVISIBLE_BY = 128  # Megatron's make_vocab_size_divisible_by


def available_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def load_config(name_or_path: str) -> dict[str, Any]:
    """A shipped model config by name (`deepseek-v3`) or any JSON file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = MODELS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(f"no model config {name_or_path!r}; shipped: {available_models()}")
    return json.loads(path.read_text())


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainerLayout:
    """A Megatron trainer's parallel layout. World size is tp * pp * dp; experts use ep * etp * edp * pp.

    `row_blocks` is the publisher's (`Publisher(row_blocks=...)`): row-parallel shards as that many column blocks.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int = 1
    gpus_per_node: int = 8
    row_blocks: int = 1

    def __post_init__(self) -> None:
        ParallelCoords(tp_size=self.tp, pp_size=self.pp, ep_size=self.ep, dp_size=self.dp)  # the library's checks
        check_requested(self.row_blocks)
        if self.etp <= 0 or self.gpus_per_node <= 0:
            raise ConfigError(f"trainer etp {self.etp} and gpus_per_node {self.gpus_per_node} must be positive")
        if (self.tp * self.dp) % (self.ep * self.etp):
            raise ConfigError(f"trainer tp*dp ({self.tp * self.dp}) is not a multiple of ep*etp ({self.ep * self.etp})")

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        return self.tp * self.dp // (self.ep * self.etp)

    def coords(self, rank: int) -> ParallelCoords:
        """Where trainer rank `rank` sits: dense order tp-dp-pp (TP fastest); EP within each stage's tp*dp."""
        pp_rank, within = divmod(rank, self.tp * self.dp)
        dp_rank, tp_rank = divmod(within, self.tp)
        return ParallelCoords(
            tp_rank=tp_rank, tp_size=self.tp, pp_rank=pp_rank, pp_size=self.pp,
            ep_rank=within // self.etp % self.ep, ep_size=self.ep, dp_rank=dp_rank, dp_size=self.dp,
        )  # fmt: skip

    def etp_rank(self, rank: int) -> int:
        """Rank `rank`'s place within its expert's tensor-parallel group (expert order tp-ep-dp-pp)."""
        return rank % (self.tp * self.dp) % self.etp

    def describe(self) -> str:
        blocks = f", row-parallel shards in {self.row_blocks} column blocks" if self.row_blocks > 1 else ""
        return f"TP{self.tp} PP{self.pp} EP{self.ep} ETP{self.etp} DP{self.dp} ({self.world} GPUs{blocks})"


@dataclass(frozen=True, kw_only=True, slots=True)
class GlobalTensor:
    """One global tensor of the model, before sharding."""

    name: str
    role: Role
    shape: tuple[int, ...]
    dtype: str
    stage: int
    expert: int = -1


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: even, the remainder going to middle stages first (the ends hold the
    embedding and the output layer)."""
    sizes = [num_layers // pp] * pp
    order = [*range(1, pp - 1), 0, pp - 1] if pp > 2 else list(range(pp))
    for i in range(num_layers % pp):
        sizes[order[i]] += 1
    return sizes


def model_meta(cfg: dict[str, Any], *, tp: int = 1) -> ModelMeta:
    """The ModelMeta a publisher would declare (padded vocab for trainer TP `tp`)."""
    heads = cfg["num_attention_heads"]
    mla = "kv_lora_rank" in cfg
    multiple = VOCAB_DIVISIBLE_BY * tp
    return ModelMeta(
        architecture=cfg["model_type"],
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=heads if mla else cfg["num_key_value_heads"],
        kv_channels=cfg["v_head_dim"] if mla else cfg.get("head_dim", cfg["hidden_size"] // heads),
        ffn_hidden_size=cfg["intermediate_size"],
        padded_vocab_size=math.ceil(cfg["vocab_size"] / multiple) * multiple,
        vocab_size=cfg["vocab_size"],
        tied_embeddings=cfg.get("tie_word_embeddings", False),
        # MLA's q / kv latent norms are what Megatron's `qk_layernorm` builds (the reader reports it so).
        qk_layernorm=cfg.get("qk_layernorm", False) or mla,
        num_experts=cfg.get("n_routed_experts", cfg.get("num_experts", 0)),
        moe_ffn_hidden_size=cfg.get("moe_intermediate_size", 0),
        params_dtype=cfg.get("torch_dtype", "bfloat16"),
        q_lora_rank=(cfg.get("q_lora_rank") or 0) if mla else 0,
        kv_lora_rank=cfg["kv_lora_rank"] if mla else 0,
        qk_nope_head_dim=cfg["qk_nope_head_dim"] if mla else 0,
        qk_rope_head_dim=cfg["qk_rope_head_dim"] if mla else 0,
        v_head_dim=cfg["v_head_dim"] if mla else 0,
    )


def _attention(cfg: dict[str, Any], p: str, dt: str, lin: str) -> list[tuple[str, Role, tuple[int, ...], str]]:
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    if "kv_lora_rank" in cfg:  # MLA
        qr, kr, rope = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        nope, vd = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
        return [
            (f"{p}input_layernorm.weight", Role.REPLICATED, (h,), dt),
            (f"{p}self_attention.linear_q_down_proj.weight", Role.REPLICATED, (qr, h), lin),
            (f"{p}self_attention.linear_q_up_proj.layer_norm_weight", Role.REPLICATED, (qr,), dt),
            (f"{p}self_attention.linear_q_up_proj.weight", Role.COLUMN, (nh * (nope + rope), qr), lin),
            (f"{p}self_attention.linear_kv_down_proj.weight", Role.REPLICATED, (kr + rope, h), lin),
            (f"{p}self_attention.linear_kv_up_proj.layer_norm_weight", Role.REPLICATED, (kr,), dt),
            (f"{p}self_attention.linear_kv_up_proj.weight", Role.COLUMN, (nh * (nope + vd), kr), lin),
            (f"{p}self_attention.linear_proj.weight", Role.ROW, (h, nh * vd), lin),
        ]
    ng, d = cfg["num_key_value_heads"], cfg.get("head_dim", h // nh)
    out = [
        (f"{p}self_attention.linear_qkv.layer_norm_weight", Role.REPLICATED, (h,), dt),
        (f"{p}self_attention.linear_qkv.weight", Role.QKV_COLUMN, ((nh + 2 * ng) * d, h), lin),
    ]
    if cfg.get("qk_layernorm", False):
        out += [
            (f"{p}self_attention.q_layernorm.weight", Role.REPLICATED, (d,), dt),
            (f"{p}self_attention.k_layernorm.weight", Role.REPLICATED, (d,), dt),
        ]
    return [*out, (f"{p}self_attention.linear_proj.weight", Role.ROW, (h, nh * d), lin)]


def global_tensors(cfg: dict[str, Any], pp: int, *, linear_dtype: str | None = None) -> list[GlobalTensor]:
    """Every global tensor of the model, in publishing order, with its pipeline stage."""
    dt = cfg.get("torch_dtype", "bfloat16")
    lin = linear_dtype or dt
    h, vocab_rows = cfg["hidden_size"], model_meta(cfg).padded_vocab_size
    experts = cfg.get("n_routed_experts", cfg.get("num_experts", 0))
    moe_ffn, shared = cfg.get("moe_intermediate_size", 0), cfg.get("n_shared_experts", 0)
    dense_first = cfg.get("first_k_dense_replace", 0) if experts else cfg["num_hidden_layers"]
    out = [
        GlobalTensor(
            name="embedding.word_embeddings.weight", role=Role.VOCAB_PARALLEL, shape=(vocab_rows, h), dtype=dt, stage=0
        )
    ]
    layer = 0
    for stage, count in enumerate(stage_layers(cfg["num_hidden_layers"], pp)):
        for _ in range(count):
            p = f"decoder.layers.{layer}."
            rows = _attention(cfg, p, dt, lin)
            if layer < dense_first:
                ffn = cfg["intermediate_size"]
                rows += [
                    (f"{p}mlp.linear_fc1.layer_norm_weight", Role.REPLICATED, (h,), dt),
                    (f"{p}mlp.linear_fc1.weight", Role.GATED_MLP_COLUMN, (2 * ffn, h), lin),
                    (f"{p}mlp.linear_fc2.weight", Role.ROW, (h, ffn), lin),
                ]
            else:
                rows += [
                    (f"{p}pre_mlp_layernorm.weight", Role.REPLICATED, (h,), dt),
                    (f"{p}mlp.router.weight", Role.REPLICATED, (experts, h), dt),
                ]
                if cfg.get("topk_method") == "noaux_tc":
                    rows.append((f"{p}mlp.router.expert_bias", Role.REPLICATED, (experts,), "float32"))
                if shared:
                    rows += [
                        (
                            f"{p}mlp.shared_experts.linear_fc1.weight",
                            Role.GATED_MLP_COLUMN,
                            (2 * shared * moe_ffn, h),
                            lin,
                        ),
                        (f"{p}mlp.shared_experts.linear_fc2.weight", Role.ROW, (h, shared * moe_ffn), lin),
                    ]
            out += [GlobalTensor(name=n, role=r, shape=s, dtype=d, stage=stage) for n, r, s, d in rows]
            if layer >= dense_first:
                for e in range(experts):
                    out += [
                        GlobalTensor(
                            name=f"{p}mlp.experts.linear_fc1.weight{e}",
                            role=Role.EXPERT_GATED_COLUMN,
                            shape=(2 * moe_ffn, h),
                            dtype=lin,
                            stage=stage,
                            expert=e,
                        ),
                        GlobalTensor(
                            name=f"{p}mlp.experts.linear_fc2.weight{e}",
                            role=Role.EXPERT_ROW,
                            shape=(h, moe_ffn),
                            dtype=lin,
                            stage=stage,
                            expert=e,
                        ),
                    ]
            layer += 1
    last = pp - 1
    out.append(
        GlobalTensor(name="decoder.final_layernorm.weight", role=Role.REPLICATED, shape=(h,), dtype=dt, stage=last)
    )
    if not cfg.get("tie_word_embeddings", False):
        out.append(
            GlobalTensor(
                name="output_layer.weight", role=Role.VOCAB_PARALLEL, shape=(vocab_rows, h), dtype=dt, stage=last
            )
        )
    return out


def _nbytes(t: GlobalTensor) -> int:
    return math.prod(t.shape) * DTYPE_SIZES[t.dtype]


def model_bytes(cfg: dict[str, Any], *, linear_dtype: str | None = None) -> int:
    """Bytes of one full copy of the model (padded vocabulary rows included)."""
    return tensors_bytes(global_tensors(cfg, 1, linear_dtype=linear_dtype))


def tensors_bytes(tensors: list[GlobalTensor]) -> int:
    """Bytes of one copy of these global tensors."""
    return sum(_nbytes(t) for t in tensors)


def synthesize_sources(
    cfg: dict[str, Any], layout: TrainerLayout, *, linear_dtype: str | None = None
) -> tuple[ModelMeta, list[SourceRecord]]:
    """The ModelMeta and one SourceRecord per trainer rank of `layout`."""
    tensors = global_tensors(cfg, layout.pp, linear_dtype=linear_dtype)
    return shard_sources(tensors, model_meta(cfg, tp=layout.tp), layout)


def shard_sources(
    tensors: list[GlobalTensor], meta: ModelMeta, layout: TrainerLayout
) -> tuple[ModelMeta, list[SourceRecord]]:
    """One SourceRecord per trainer rank of `layout`, cut from the model's global tensors (each with its
    stage and, for routed experts, its global expert id) with the library's own shard formula."""
    if meta.num_experts and meta.num_experts % layout.ep:
        raise ConfigError(f"{meta.num_experts} experts do not split over trainer EP {layout.ep}")
    per_ep = meta.num_experts // layout.ep if meta.num_experts else 0
    if meta.padded_vocab_size != tensors[0].shape[0]:  # vocabulary padded for this trainer TP
        tensors = [
            t
            if t.role is not Role.VOCAB_PARALLEL
            else GlobalTensor(
                name=t.name, role=t.role, shape=(meta.padded_vocab_size, t.shape[1]), dtype=t.dtype, stage=t.stage
            )
            for t in tensors
        ]
    if any(t.stage >= layout.pp for t in tensors):
        raise ConfigError(f"tensors are placed on more than the layout's {layout.pp} pipeline stages")
    by_stage: list[list[GlobalTensor]] = [[] for _ in range(layout.pp)]
    for t in tensors:
        by_stage[t.stage].append(t)
    sources = []
    for rank in range(layout.world):
        coords = layout.coords(rank)
        descs, offset = [], 0
        for t in by_stage[coords.pp_rank]:
            if t.expert >= 0 and t.expert // per_ep != coords.ep_rank:
                continue
            # Experts split over expert TP, everything else over TP, both as Megatron-Core splits them.
            shard_rank, size = (layout.etp_rank(rank), layout.etp) if t.expert >= 0 else (coords.tp_rank, layout.tp)
            desc = TensorDesc.shard(
                name=t.name, role=t.role, dtype=t.dtype, global_shape=t.shape, rank=shard_rank, size=size,
                byte_offset=offset,
            )  # fmt: skip
            descs.append(desc)
            offset += desc.nbytes
        sources.append(
            SourceRecord(
                rank=rank,
                coords=coords,
                agent_name=f"trainer-{rank}",
                agent_metadata=b"",
                regions=(Region(index=0, addr=1 << 40, nbytes=max(offset, 1), device="cuda"),),
                tensors=blocked_descs(descs, layout.row_blocks),
            )
        )
    return meta, sources


def mirror_bytes(sources: list[SourceRecord]) -> list[int]:
    """Per trainer rank, the bytes of the tensors it publishes as column blocks (several descriptors of
    one name): what a live publisher's mirror holds (before its 256-byte alignment per tensor)."""
    out = []
    for src in sources:
        counts: dict[str, int] = {}
        for d in src.tensors:
            counts[d.name] = counts.get(d.name, 0) + 1
        out.append(sum(d.nbytes for d in src.tensors if counts[d.name] > 1))
    return out
