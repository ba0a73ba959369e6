"""Plan, stage and assemble: every engine tensor holds exactly the global rows its target names.

The trainer ranks are synthetic: each global tensor is random, each rank's shards are cut from it
with the library's shard formula and packed into one byte buffer, and the plan's reads are carried
out by copying bytes between those buffers and a staging buffer, as the transport would.
"""

from __future__ import annotations

import re

import pytest
import torch

from refit.dtypes import torch_dtype
from refit.errors import LayoutError
from refit.plan.assemble import assemble
from refit.plan.planner import Plan, plan_refit
from refit.plan.targets import EngineLayout, Target
from refit.types import ModelMeta, ParallelCoords, Region, Role, SourceRecord, TensorDesc

H, NH, NG, D, F = 16, 8, 2, 4, 32  # hidden, heads, query groups, head dim, ffn
L = "decoder.layers.0."


def meta(vocab: int, padded: int) -> ModelMeta:
    return ModelMeta(
        architecture="llama", num_layers=1, hidden_size=H, num_attention_heads=NH, num_query_groups=NG,
        kv_channels=D, ffn_hidden_size=F, padded_vocab_size=padded, vocab_size=vocab,
    )  # fmt: skip


def global_tensors(padded: int, *, seed: int = 0) -> dict[str, tuple[Role, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    return {
        "embedding.word_embeddings.weight": (Role.VOCAB_PARALLEL, rand(padded, H)),
        L + "input_layernorm.weight": (Role.REPLICATED, rand(H)),
        L + "self_attention.linear_qkv.weight": (Role.QKV_COLUMN, rand((NH + 2 * NG) * D, H)),
        L + "self_attention.linear_proj.weight": (Role.ROW, rand(H, NH * D)),
        L + "pre_mlp_layernorm.weight": (Role.REPLICATED, rand(H)),
        L + "mlp.linear_fc1.weight": (Role.GATED_MLP_COLUMN, rand(2 * F, H)),
        L + "mlp.linear_fc2.weight": (Role.ROW, rand(H, F)),
        "decoder.final_layernorm.weight": (Role.REPLICATED, rand(H)),
        "output_layer.weight": (Role.VOCAB_PARALLEL, rand(padded, H)),
    }


def shard_of(desc: TensorDesc, tensor: torch.Tensor) -> torch.Tensor:
    """The rows of `tensor` that `desc` describes, stored part after part (Megatron's layout)."""
    if desc.partition_dim == -1:
        return tensor
    d, s = desc.partition_dim, desc.partition_stride
    rows = desc.local_shape[d] // s
    return torch.cat([part.narrow(d, desc.offset, rows) for part in tensor.chunk(s, dim=d)], dim=d)


def trainer(
    tensors: dict[str, tuple[Role, torch.Tensor]], tp: int
) -> tuple[list[SourceRecord], dict[int, torch.Tensor]]:
    """TP ranks of one trainer replica: their records and their region bytes."""
    sources, buffers = [], {}
    for rank in range(tp):
        descs, chunks, at = [], [], 0
        for name, (role, tensor) in tensors.items():
            shape = tuple(tensor.shape)
            desc = TensorDesc.shard(
                name=name, role=role, dtype="float32", global_shape=shape, rank=rank, size=tp, byte_offset=at
            )
            descs.append(desc)
            chunks.append(shard_of(desc, tensor).contiguous().view(-1).view(torch.uint8))
            at += desc.nbytes
        buffers[rank] = torch.cat(chunks)
        sources.append(
            SourceRecord(
                rank=rank, coords=ParallelCoords(tp_rank=rank, tp_size=tp), agent_name=f"a{rank}", agent_metadata=b"",
                regions=(Region(index=0, addr=4096, nbytes=at),), tensors=tuple(descs),
            )
        )  # fmt: skip
    return sources, buffers


def stage(plan: Plan, buffers: dict[int, torch.Tensor]) -> torch.Tensor:
    """Carry out the plan's reads: block i of a read comes from remote_offset + i * remote_stride."""
    staging = torch.full((plan.staging_bytes,), 0xFF, dtype=torch.uint8)  # not zeros: zeros must be made
    for r in plan.reads:
        for i in range(r.count):
            src = r.remote_offset + i * r.remote_stride
            dst = r.local_offset + i * r.block_bytes
            staging[dst : dst + r.block_bytes] = buffers[r.rank][src : src + r.block_bytes]
    return staging


def expected(target: Target, tensor: torch.Tensor) -> torch.Tensor:
    """The target cut straight from the global tensor, zeros past its rows."""
    if target.dim is None:
        return tensor
    out = torch.zeros(target.shape, dtype=torch_dtype(target.dtype))
    at = 0
    for a, b in target.rows:
        out.narrow(target.dim, at, b - a).copy_(tensor.narrow(target.dim, a, b - a))
        at += b - a
    return out


def refit_rank(
    *, vocab: int, padded: int, trainer_tp: int, layout: EngineLayout
) -> tuple[Plan, dict[str, torch.Tensor]]:
    tensors = global_tensors(padded)
    sources, buffers = trainer(tensors, trainer_tp)
    plan = plan_refit(model=meta(vocab, padded), sources=sources, layout=layout)
    out = assemble(plan, stage(plan, buffers))
    assert set(out) == {t.hf_name for t in plan.targets}
    for t in plan.targets:
        assert tuple(out[t.hf_name].shape) == t.shape, t.hf_name
        assert torch.equal(out[t.hf_name], expected(t, tensors[t.source][1])), t.hf_name
    return plan, out


@pytest.mark.parametrize(("trainer_tp", "engine_tp"), [(1, 1), (2, 1), (1, 2), (2, 4), (4, 2)])
def test_every_hf_tensor_holds_its_global_rows(trainer_tp: int, engine_tp: int) -> None:
    tensors = global_tensors(64)
    for rank in range(engine_tp):
        _, out = refit_rank(
            vocab=60, padded=64, trainer_tp=trainer_tp, layout=EngineLayout(tp_rank=rank, tp_size=engine_tp)
        )
        if engine_tp == 1:  # hand-checked: the real vocabulary, and q/k/v of both query groups
            assert torch.equal(out["model.embed_tokens.weight"], tensors["embedding.word_embeddings.weight"][1][:60])
            qkv = tensors[L + "self_attention.linear_qkv.weight"][1]
            assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], torch.cat([qkv[16:20], qkv[40:44]]))


@pytest.mark.parametrize("engine_tp", [1, 2])
def test_megatron_scheme_pads_the_engines_wider_vocabulary_with_zeros(engine_tp: int) -> None:
    for rank in range(engine_tp):
        layout = EngineLayout(tp_rank=rank, tp_size=engine_tp, scheme="megatron", padded_vocab_size=128)
        _, out = refit_rank(vocab=60, padded=64, trainer_tp=2, layout=layout)
        emb = out["embedding.word_embeddings.weight"]
        assert emb.shape == (128 // engine_tp, H)
        if rank == engine_tp - 1 and engine_tp > 1:  # rows 64.. were never published
            assert not emb.any()


def test_hf_rank_whose_vocabulary_share_is_all_padding_gets_empty_tables() -> None:
    # 65 rows padded to 128 over engine TP 4: shares of 32, and rank 3's rows 96..128 are all padding.
    layout = EngineLayout(tp_rank=3, tp_size=4)
    plan, out = refit_rank(vocab=65, padded=128, trainer_tp=2, layout=layout)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (0, H) and out[name].dtype == torch.float32
    assert not any(p.tensor in ("embedding.word_embeddings.weight", "output_layer.weight") for p in plan.pieces)
    # Rank 2 holds the one real row of its share.
    _, out = refit_rank(vocab=65, padded=128, trainer_tp=2, layout=EngineLayout(tp_rank=2, tp_size=4))
    assert out["model.embed_tokens.weight"].shape == (1, H)


def test_a_target_nothing_was_staged_for_is_refused() -> None:
    tensors = global_tensors(64)
    sources, buffers = trainer(tensors, 1)
    plan = plan_refit(model=meta(60, 64), sources=sources, layout=EngineLayout())
    lost = Plan(
        targets=plan.targets, pieces=tuple(p for p in plan.pieces if "linear_fc2" not in p.tensor), reads=plan.reads,
        staging_bytes=plan.staging_bytes, bytes_by_rank=plan.bytes_by_rank,
    )  # fmt: skip
    with pytest.raises(LayoutError, match=re.escape(f"nothing of {L}mlp.linear_fc2.weight was staged")):
        assemble(lost, stage(plan, buffers))
