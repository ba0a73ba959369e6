"""Which rows of which global Megatron tensor each engine tensor of an engine rank needs.

A target is one tensor as one engine rank holds it, expressed as an ordered list of row intervals
of one *global* Megatron tensor along one dimension. Un-interleaving QKV, splitting `[gate; up]`,
dropping vocab padding and engine-side TP slicing are all just choices of intervals, so the planner
and the assembler never need to know about roles.

Two schemes name and split the targets:

- `hf` (the default; transformers and vLLM): Hugging Face names, and vLLM's TP convention. q heads
  and gate/up rows are split evenly by engine rank; k/v heads too while engine TP <= query groups,
  otherwise each rank holds the one group its q heads belong to; row-parallel weights are split on
  dim 1; the rest is replicated. Vocab rows follow `vocab_share`: the vocabulary is padded to a
  multiple of `EngineLayout.vocab_padding`, the padded rows are split evenly, and a rank holds the
  real rows of its share (none at all when its share is all padding).
- `megatron`: Megatron names, each tensor split exactly as Megatron-Core splits it at the engine's
  own TP (QKV as contiguous query-group blocks of the interleaved tensor, gated fc1 as
  `[gate_r; up_r]`, vocab as even rows of the engine's padded table). It needs no name table, so it
  plans any tensor that carries a role; Megatron-to-Megatron resharding (`MegatronEngine`) uses it.

Multi-latent attention (DeepSeek-V3) needs no rule of its own in either scheme: its up projections
(`q_b_proj`, `kv_b_proj`, `q_proj`) are column-parallel by heads, `o_proj` row-parallel, its norms
replicated. Only its down projections (`q_a_proj`, `kv_a_proj_with_mqa`) differ: Megatron's local spec
splits them on dim 0 (the `megatron` scheme follows), HF-convention engines hold them whole.

MoE experts (expert roles) are one global tensor per expert. In both schemes an engine rank needs
only the experts of its expert-parallel rank (contiguous blocks of `num_experts / ep_size`), split
within each expert by its expert-TP rank. In the `hf` scheme an expert's fc1 yields its `gate_proj`
and `up_proj` targets and fc2 its `down_proj` (per-expert names; `HFEngine` maps them onto slices of
transformers' fused `gate_up_proj` / `down_proj` parameters).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from refit.errors import ConfigError, ModelMismatchError
from refit.plan.naming import MLA_DOWN_PROJECTIONS, expert_index, hf_names
from refit.types import ModelMeta, Role, TensorDesc

Interval = tuple[int, int]

DEFAULT_VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE


class Scheme(StrEnum):
    """How engine targets are named and split."""

    HF = "hf"  # Hugging Face names, q/k/v and gate/up separate (vLLM, transformers)
    MEGATRON = "megatron"  # Megatron names and Megatron-Core's own split at the engine's TP


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineLayout:
    """An engine rank's place in its own tensor- and expert-parallel groups, and its real vocabulary.

    `expert_tp_size` 0 means: experts are split like dense layers (by the engine TP) when `ep_size` is
    1, and not split at all under expert parallelism (vLLM's convention).
    """

    tp_rank: int = 0
    tp_size: int = 1
    vocab_size: int = 0  # 0: take the catalog's declared vocabulary (or the padded one)
    padded_vocab_size: int = 0  # megatron scheme: the engine's own padded vocabulary (0: the trainer's)
    vocab_padding: int = DEFAULT_VOCAB_PADDING  # hf scheme: the engine pads its vocabulary to a multiple of this
    ep_rank: int = 0
    ep_size: int = 1
    expert_tp_rank: int = 0
    expert_tp_size: int = 0
    scheme: Scheme = Scheme.HF

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "scheme", Scheme(self.scheme))
        except ValueError:
            raise ConfigError(f"unknown engine scheme {self.scheme!r}; known: {[s.value for s in Scheme]}") from None
        for kind in ("tp", "ep", "expert_tp"):
            rank, size = getattr(self, f"{kind}_rank"), getattr(self, f"{kind}_size")
            if size < (0 if kind == "expert_tp" else 1) or not 0 <= rank < max(size, 1):
                raise ConfigError(f"engine {kind}_rank {rank} / {kind}_size {size} is not a valid position")
        if self.vocab_size < 0 or self.padded_vocab_size < 0:
            raise ConfigError(f"engine vocab sizes must be >= 0, got {self.vocab_size}, {self.padded_vocab_size}")
        if self.vocab_padding <= 0:
            raise ConfigError(f"engine vocab_padding must be positive, got {self.vocab_padding}")

    @property
    def expert_tp(self) -> tuple[int, int]:
        """(rank, size) of this engine rank within each expert."""
        if self.expert_tp_size:
            return self.expert_tp_rank, self.expert_tp_size
        return (self.tp_rank, self.tp_size) if self.ep_size == 1 else (0, 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class Target:
    """One engine tensor of one engine rank: rows `rows` of Megatron tensor `source` along `dim`.

    `shape[dim]` may exceed the rows: the rest are zeros (padding the engine holds but nobody
    publishes). `rows` is empty when all of them are.
    """

    hf_name: str  # the engine's name for it (a Megatron name in the megatron scheme)
    source: str
    dim: int | None  # None: the whole tensor
    rows: tuple[Interval, ...]
    shape: tuple[int, ...]
    dtype: str


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted union of half-open intervals (empty ones dropped, touching ones joined)."""
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if a >= b:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _coalesce(blocks: Iterable[Interval]) -> tuple[Interval, ...]:
    """Join touching blocks while keeping their order (unlike merge_intervals, no sorting)."""
    out: list[list[int]] = []
    for a, b in blocks:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _even(n: int, parts: int, index: int, what: str) -> Interval:
    if n % parts:
        raise ModelMismatchError(f"{what} ({n}) is not divisible by engine TP size {parts}")
    size = n // parts
    return index * size, (index + 1) * size


def vocab_share(vocab: int, padding: int, tp_rank: int, tp_size: int) -> Interval:
    """Rows `[start, stop)` of the real vocabulary that engine TP rank `tp_rank` holds (vLLM's rule).

    vLLM's VocabParallelEmbedding / ParallelLMHead pad the vocabulary to a multiple of `padding`,
    give each rank an equal share of the padded rows and zero-fill the rows past `vocab` themselves.
    `stop == start` when the rank's share is all padding.
    """
    if padding <= 0 or vocab < 0 or tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ConfigError(f"no vocabulary share for vocab {vocab}, padding {padding}, TP rank {tp_rank}/{tp_size}")
    padded = math.ceil(vocab / padding) * padding
    start, stop = _even(padded, tp_size, tp_rank, f"vocabulary {vocab} padded to {padding}")
    return start, max(start, min(vocab, stop))


def _target(
    desc: TensorDesc, name: str, dim: int | None, rows: tuple[Interval, ...], shape: tuple[int, ...] | None = None
) -> Target:
    """A target of `desc`; its shape is the global one with `rows` along `dim` unless given."""
    if shape is None:
        shape = tuple(sum(b - a for a, b in rows) if i == dim else n for i, n in enumerate(desc.global_shape))
    return Target(hf_name=name, source=desc.name, dim=dim, rows=rows, shape=shape, dtype=desc.dtype)


def _gate_up(desc: TensorDesc, rank: int, size: int) -> tuple[Interval, Interval]:
    """Rank `rank` of `size`'s gate rows and up rows of a gated fc1 `[gate; up]` (global rows)."""
    half = desc.global_shape[0] // 2
    a, b = _even(half, size, rank, f"{desc.name} rows")
    return (a, b), (half + a, half + b)


def _qkv_rows(model: ModelMeta, layout: EngineLayout) -> tuple[tuple[Interval, ...], ...]:
    """Row blocks (in units of global rows) of q, k and v for this engine rank."""
    nh, ng, d, t, tp = (
        model.num_attention_heads,
        model.num_query_groups,
        model.kv_channels,
        layout.tp_rank,
        layout.tp_size,
    )
    hpg = nh // ng
    q0, q1 = _even(nh, tp, t, "num_attention_heads")
    if tp <= ng:
        g0, g1 = _even(ng, tp, t, "num_query_groups")
    else:
        if tp % ng:
            raise ModelMismatchError(f"engine TP size {tp} is neither a divisor nor a multiple of {ng} KV heads")
        g0 = t // (tp // ng)
        g1 = g0 + 1

    def block(group: int, slot: int) -> Interval:
        # Megatron interleaves per query group: hpg q heads, then k, then v, each `d` rows.
        start = (group * (hpg + 2) + slot) * d
        return start, start + d

    q = _coalesce(block(h // hpg, h % hpg) for h in range(q0, q1))
    k = _coalesce(block(g, hpg) for g in range(g0, g1))
    v = _coalesce(block(g, hpg + 1) for g in range(g0, g1))
    return q, k, v


EXPERT_ROLES = frozenset({Role.EXPERT_GATED_COLUMN, Role.EXPERT_COLUMN, Role.EXPERT_ROW, Role.EXPERT_REPLICATED})


def _expert_targets(model: ModelMeta, desc: TensorDesc, layout: EngineLayout) -> list[Target]:
    """Targets of one expert tensor: none unless this engine rank's EP rank owns the expert."""
    ep, ep_size = layout.ep_rank, layout.ep_size
    if model.num_experts <= 0 or model.num_experts % ep_size:
        raise ModelMismatchError(f"{model.num_experts} experts cannot be split over engine EP size {ep_size}")
    per_rank = model.num_experts // ep_size
    if not ep * per_rank <= expert_index(desc.name) < (ep + 1) * per_rank:
        return []
    t, tp = layout.expert_tp
    megatron = layout.scheme is Scheme.MEGATRON
    names = (
        (desc.name,)
        if megatron
        else hf_names(desc.name, gated=model.gated_linear_unit, architecture=model.architecture)
    )
    if desc.role is Role.EXPERT_REPLICATED:
        return [_target(desc, names[0], None, ())]
    if desc.role is Role.EXPERT_ROW:
        return [_target(desc, names[0], 1, (_even(desc.global_shape[1], tp, t, f"{desc.name} columns"),))]
    if desc.role is Role.EXPERT_COLUMN:
        return [_target(desc, names[0], 0, (_even(desc.global_shape[0], tp, t, f"{desc.name} rows"),))]
    gate, up = _gate_up(desc, t, tp)
    if megatron:
        return [_target(desc, names[0], 0, _coalesce((gate, up)))]
    return [_target(desc, names[0], 0, (gate,)), _target(desc, names[1], 0, (up,))]


def _megatron_targets(model: ModelMeta, desc: TensorDesc, layout: EngineLayout) -> list[Target]:
    """Megatron-named targets, split exactly as Megatron-Core splits each role at the engine's TP."""
    t, tp, role, shape = layout.tp_rank, layout.tp_size, desc.role, desc.global_shape
    if role is Role.QKV_COLUMN:
        ng = model.num_query_groups
        per_group = shape[0] // ng
        if shape[0] % ng or per_group != (model.num_attention_heads // ng + 2) * model.kv_channels:
            raise ModelMismatchError(f"{desc.name}: {shape[0]} QKV rows do not match {ng} query groups")
        g0, g1 = _even(ng, tp, t, "num_query_groups")
        return [_target(desc, desc.name, 0, ((g0 * per_group, g1 * per_group),))]
    if role is Role.GATED_MLP_COLUMN:
        return [_target(desc, desc.name, 0, _coalesce(_gate_up(desc, t, tp)))]
    if role is Role.VOCAB_PARALLEL:
        # The engine pads the vocabulary for its own TP and may pad further than the trainer did:
        # its shard keeps its full shape, and rows the trainer never published arrive as zeros.
        padded = layout.padded_vocab_size or shape[0]
        a, b = _even(padded, tp, t, f"{desc.name} padded vocabulary")
        hi = min(b, shape[0])
        return [_target(desc, desc.name, 0, ((a, hi),) if hi > a else (), shape=(b - a, *shape[1:]))]
    if role is Role.COLUMN:
        return [_target(desc, desc.name, 0, (_even(shape[0], tp, t, f"{desc.name} rows"),))]
    if role is Role.ROW:
        return [_target(desc, desc.name, 1, (_even(shape[1], tp, t, f"{desc.name} columns"),))]
    return [_target(desc, desc.name, None, ())]


def _hf_targets(model: ModelMeta, desc: TensorDesc, layout: EngineLayout) -> list[Target]:
    """Hugging Face-named targets, split by vLLM's TP convention."""
    names = hf_names(desc.name, gated=model.gated_linear_unit, architecture=model.architecture)
    t, tp, role, shape = layout.tp_rank, layout.tp_size, desc.role, desc.global_shape
    if role is Role.QKV_COLUMN:
        expected = (model.num_attention_heads + 2 * model.num_query_groups) * model.kv_channels
        if shape[0] != expected:
            raise ModelMismatchError(f"{desc.name}: {shape[0]} QKV rows, expected {expected}")
        return [_target(desc, n, 0, rows) for n, rows in zip(names, _qkv_rows(model, layout), strict=True)]
    if role is Role.GATED_MLP_COLUMN:
        gate, up = _gate_up(desc, t, tp)
        return [_target(desc, names[0], 0, (gate,)), _target(desc, names[1], 0, (up,))]
    if role is Role.VOCAB_PARALLEL:
        vocab = layout.vocab_size or model.vocab_size or shape[0]
        if vocab > shape[0]:
            raise ModelMismatchError(f"{desc.name}: engine vocabulary {vocab} > published rows {shape[0]}")
        start, stop = vocab_share(vocab, layout.vocab_padding, t, tp)
        # A share that is all padding holds no real row: an empty target, not an empty interval,
        # so that it assembles as zeros rather than as a tensor nothing was staged for.
        return [_target(desc, names[0], 0, ((start, stop),) if stop > start else ())]
    if role is Role.COLUMN and names[0].endswith(MLA_DOWN_PROJECTIONS):
        # MLA's down projections: column-parallel in Megatron's local spec, whole in HF-convention engines.
        return [_target(desc, names[0], 0, ((0, shape[0]),))]
    if role is Role.COLUMN:
        return [_target(desc, names[0], 0, (_even(shape[0], tp, t, f"{desc.name} rows"),))]
    if role is Role.ROW:
        return [_target(desc, names[0], 1, (_even(shape[1], tp, t, f"{desc.name} columns"),))]
    return [_target(desc, n, None, ()) for n in names]


def targets_for(model: ModelMeta, desc: TensorDesc, layout: EngineLayout) -> list[Target]:
    """The targets one global Megatron tensor yields for an engine rank (HF or Megatron names).

    `desc` is any one rank's descriptor of the tensor (role, dtype and global shape are shared).
    """
    if desc.role in EXPERT_ROLES:
        return _expert_targets(model, desc, layout)
    if layout.scheme is Scheme.MEGATRON:
        return _megatron_targets(model, desc, layout)
    return _hf_targets(model, desc, layout)
