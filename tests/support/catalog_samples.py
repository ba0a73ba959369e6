"""Small, valid catalog values (models, sources) for the catalog's wire, server and CLI tests."""

from __future__ import annotations

import dataclasses

from refit.types import ModelMeta, ParallelCoords, Region, Role, SourceRecord, TensorDesc

MODEL = ModelMeta(
    architecture="llama",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    ffn_hidden_size=128,
    padded_vocab_size=128,
    vocab_size=100,
    params_dtype="bfloat16",
)


def model(**changes: object) -> ModelMeta:
    return dataclasses.replace(MODEL, **changes)


def source(rank: int, *, tp_size: int = 1, agent: str | None = None, metadata: bytes = b"nixl\x00meta") -> SourceRecord:
    """Rank `rank`'s part: one column-parallel, one row-parallel and one replicated tensor."""
    tp = rank % tp_size
    col = TensorDesc.shard(
        name="decoder.layers.0.mlp.linear_fc1.weight",
        role=Role.GATED_MLP_COLUMN,
        dtype="bfloat16",
        global_shape=(256, 64),
        rank=tp,
        size=tp_size,
    )
    row = TensorDesc.shard(
        name="decoder.layers.0.mlp.linear_fc2.weight",
        role=Role.ROW,
        dtype="bfloat16",
        global_shape=(64, 128),
        rank=tp,
        size=tp_size,
        byte_offset=col.nbytes,
    )
    norm = TensorDesc(
        name="decoder.final_layernorm.weight",
        role=Role.REPLICATED,
        dtype="float32",
        local_shape=(64,),
        global_shape=(64,),
        region=1,
    )
    return SourceRecord(
        rank=rank,
        coords=ParallelCoords(tp_rank=tp, tp_size=tp_size, dp_rank=rank // tp_size, dp_size=8),
        agent_name=agent or f"agent-{rank}",
        agent_metadata=metadata,
        regions=(
            Region(index=0, addr=0x7F00_0000_0000 + rank * 2**30, nbytes=col.nbytes + row.nbytes, device="cuda"),
            Region(index=1, addr=0x1000, nbytes=4096, device="cpu"),
        ),
        tensors=(col, row, norm),
    )
