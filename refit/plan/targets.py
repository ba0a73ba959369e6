"""Which rows of which global Megatron tensor each Hugging Face tensor of an engine rank needs.

A target is an HF tensor, as one engine TP rank holds it, expressed as an ordered list of row
intervals of one *global* Megatron tensor along one dimension. Un-interleaving QKV, splitting
`[gate; up]`, dropping vocab padding and engine-side TP slicing are all just choices of intervals,
so the planner and the assembler never need to know about roles.

Engine TP convention (the one vLLM uses): q heads, gate/up rows and vocab rows are split evenly by
engine rank; k/v heads too while engine TP <= query groups, otherwise each rank holds the one
group its q heads belong to; row-parallel weights are split on dim 1; the rest is replicated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from refit.errors import ModelMismatchError
from refit.plan.naming import hf_names
from refit.types import ModelMeta, Role, TensorDesc

Interval = tuple[int, int]


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineLayout:
    """An engine rank's place in its own tensor-parallel group, and its real vocabulary."""

    tp_rank: int = 0
    tp_size: int = 1
    vocab_size: int = 0  # 0: take the catalog's declared vocabulary (or the padded one)


@dataclass(frozen=True, kw_only=True, slots=True)
class Target:
    """One HF tensor of one engine rank: rows `rows` of Megatron tensor `source` along `dim`."""

    hf_name: str
    source: str
    dim: int | None  # None: the whole tensor
    rows: tuple[Interval, ...]
    shape: tuple[int, ...]
    dtype: str


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted union of half-open intervals."""
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


def _shape(desc: TensorDesc, dim: int | None, rows: tuple[Interval, ...]) -> tuple[int, ...]:
    shape = list(desc.global_shape)
    if dim is not None:
        shape[dim] = sum(b - a for a, b in rows)
    return tuple(shape)


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
        start = (group * (hpg + 2) + slot) * d
        return start, start + d

    q = _coalesce(block(h // hpg, h % hpg) for h in range(q0, q1))
    k = _coalesce(block(g, hpg) for g in range(g0, g1))
    v = _coalesce(block(g, hpg + 1) for g in range(g0, g1))
    return q, k, v


def targets_for(model: ModelMeta, desc: TensorDesc, layout: EngineLayout) -> list[Target]:
    """The HF targets one global Megatron tensor yields for an engine rank.

    `desc` is any one rank's descriptor of the tensor (role, dtype and global shape are shared).
    """
    name = hf_names(desc.name, gated=model.gated_linear_unit)
    t, tp = layout.tp_rank, layout.tp_size
    role = desc.role

    def make(hf: str, dim: int | None, rows: tuple[Interval, ...]) -> Target:
        return Target(hf_name=hf, source=desc.name, dim=dim, rows=rows, shape=_shape(desc, dim, rows), dtype=desc.dtype)

    if role is Role.QKV_COLUMN:
        expected = (model.num_attention_heads + 2 * model.num_query_groups) * model.kv_channels
        if desc.global_shape[0] != expected:
            raise ModelMismatchError(f"{desc.name}: {desc.global_shape[0]} QKV rows, expected {expected}")
        return [make(hf, 0, rows) for hf, rows in zip(name.names, _qkv_rows(model, layout), strict=True)]
    if role is Role.GATED_MLP_COLUMN:
        half = desc.global_shape[0] // 2
        a, b = _even(half, tp, t, f"{desc.name} rows")
        return [make(name.names[0], 0, ((a, b),)), make(name.names[1], 0, ((half + a, half + b),))]
    if role is Role.VOCAB_PARALLEL:
        padded = desc.global_shape[0]
        vocab = layout.vocab_size or model.vocab_size or padded
        if vocab > padded:
            raise ModelMismatchError(f"{desc.name}: engine vocabulary {vocab} > published rows {padded}")
        chunk = math.ceil(vocab / tp)
        rows = ((t * chunk, min(vocab, (t + 1) * chunk)),)
        return [make(name.names[0], 0, rows)]
    if role is Role.COLUMN:
        return [make(name.names[0], 0, (_even(desc.global_shape[0], tp, t, f"{desc.name} rows"),))]
    if role is Role.ROW:
        return [make(name.names[0], 1, (_even(desc.global_shape[1], tp, t, f"{desc.name} columns"),))]
    return [make(n, None, ()) for n in name.names]
