"""MoE models end to end through the planner into an `HFEngine`, against an independent HF ground truth.

Tiny transformers 5.x models (Qwen3-MoE with a dense layer and q/k norms, Mixtral, Qwen2-MoE with a
gated shared expert) are cut by hand into Megatron-layout trainer shards, as real trainer ranks hold
them: dense tensors split by TP (with tests/support/megatron_convert's helpers), routed expert `g` on
EP rank `g // (E / EP)`, its fc1 `[gate_r; up_r]` and fc2 columns split over expert TP, and the
replicas of a dense DP / expert DP group holding equal bytes. Each rank's shards are packed into one
byte buffer and described by their real offsets; the plan's reads are carried out by copying bytes
from those buffers, the result is assembled and installed into a model of another seed. Every
parameter must then be bit-identical to the ground truth's, its storage kept, and the logits equal.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

from refit.copies import ChunkCopier
from refit.engines import HFEngine
from refit.engines.base import EngineSpec, TensorSpec, check_compatible, check_tensors
from refit.errors import ConfigError, ModelMismatchError
from refit.plan.assemble import assemble, zero_padding
from refit.plan.naming import hf_names
from refit.plan.planner import Plan, plan_refit
from refit.types import ModelMeta, ParallelCoords, Region, Role, SourceRecord, TensorDesc
from tests.support.megatron_convert import _tp_chunk, _vocab_rows, interleave_qkv

transformers = pytest.importorskip("transformers")

VOCAB, PADDED, H, E = 500, 512, 64, 4
COMMON = dict(
    vocab_size=VOCAB, hidden_size=H, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=64, tie_word_embeddings=False, num_experts_per_tok=2,
)  # fmt: skip
CONFIGS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, num_experts=E, mlp_only_layers=[1])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=32, num_local_experts=E)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       num_experts=E, mlp_only_layers=[1])),
}  # fmt: skip
TOKENS = torch.tensor([[3, 17, 256, 499, 42, 7, 101, 64]])


def build(arch: str, seed: int) -> torch.nn.Module:
    """A deterministic random model; router weights scaled so every token's routing is decisive."""
    config_class, model_class, extra = CONFIGS[arch]
    config = getattr(transformers, config_class)(**COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            value = 1.0 + 0.1 * noise if p.ndim == 1 else 0.02 * noise
            p.copy_(value * (100 if name.endswith("mlp.gate.weight") else 1))
    return model


@functools.cache
def truth(arch: str) -> torch.nn.Module:
    return build(arch, seed=1)


def meta(arch: str) -> ModelMeta:
    c = truth(arch).config
    return ModelMeta(
        architecture=arch, num_layers=c.num_hidden_layers, hidden_size=H, num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_key_value_heads, kv_channels=c.head_dim, ffn_hidden_size=c.intermediate_size,
        padded_vocab_size=PADDED, vocab_size=VOCAB, qkv_bias=arch == "qwen2_moe", qk_layernorm=arch == "qwen3_moe",
        num_experts=E, moe_ffn_hidden_size=getattr(c, "moe_intermediate_size", c.intermediate_size),
    )  # fmt: skip


def expert_name(layer: int, e: int, fc: int, grouped: bool) -> str:
    if grouped:  # TEGroupedMLP
        return f"decoder.layers.{layer}.mlp.experts.linear_fc{fc}.weight{e}"
    return f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc{fc}.weight"  # SequentialMLP, global id


def rank_shards(
    arch: str, *, tp: int, tp_rank: int, ep: int, ep_rank: int, etp: int, etp_rank: int, grouped: bool
) -> dict[str, tuple[Role, torch.Tensor, int, int]]:
    """Global Megatron name -> (role, this rank's local tensor, split rank, split size), by hand from HF."""
    model = truth(arch)
    c, sd = model.config, model.state_dict()
    out: dict[str, tuple[Role, torch.Tensor, int, int]] = {}

    def put(name: str, role: Role, tensor: torch.Tensor, rank: int = 0, size: int = 1) -> None:
        out[name] = (role, tensor.contiguous(), rank, size)

    def gated(src: str, dst: str, size: int, rank: int, role: Role) -> None:
        gate, up = (_tp_chunk(sd[f"{src}{n}_proj.weight"], size, rank, 0) for n in ("gate", "up"))
        put(dst, role, torch.cat([gate, up]), rank, size)

    for megatron, hf in (
        ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        ("output_layer.weight", "lm_head.weight"),
    ):
        put(megatron, Role.VOCAB_PARALLEL, _vocab_rows(sd[hf], PADDED, tp, tp_rank), tp_rank, tp)
    put("decoder.final_layernorm.weight", Role.REPLICATED, sd["model.norm.weight"])
    heads, groups, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    for i in range(c.num_hidden_layers):
        s, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        put(m + "input_layernorm.weight", Role.REPLICATED, sd[s + "input_layernorm.weight"])
        put(m + "pre_mlp_layernorm.weight", Role.REPLICATED, sd[s + "post_attention_layernorm.weight"])
        for p in ("weight", "bias"):
            if s + f"self_attn.q_proj.{p}" in sd:
                q, k, v = (sd[s + f"self_attn.{n}_proj.{p}"] for n in "qkv")
                qkv = interleave_qkv(q, k, v, heads=heads, groups=groups, head_dim=d)
                put(m + f"self_attention.linear_qkv.{p}", Role.QKV_COLUMN, _tp_chunk(qkv, tp, tp_rank, 0), tp_rank, tp)
        if s + "self_attn.q_norm.weight" in sd:
            put(m + "self_attention.q_layernorm.weight", Role.REPLICATED, sd[s + "self_attn.q_norm.weight"])
            put(m + "self_attention.k_layernorm.weight", Role.REPLICATED, sd[s + "self_attn.k_norm.weight"])
        o = _tp_chunk(sd[s + "self_attn.o_proj.weight"], tp, tp_rank, 1)
        put(m + "self_attention.linear_proj.weight", Role.ROW, o, tp_rank, tp)
        if s + "mlp.gate_proj.weight" in sd:  # a dense layer
            gated(s + "mlp.", m + "mlp.linear_fc1.weight", tp, tp_rank, Role.GATED_MLP_COLUMN)
            fc2 = _tp_chunk(sd[s + "mlp.down_proj.weight"], tp, tp_rank, 1)
            put(m + "mlp.linear_fc2.weight", Role.ROW, fc2, tp_rank, tp)
            continue
        put(m + "mlp.router.weight", Role.REPLICATED, sd[s + "mlp.gate.weight"])
        gate_up, down = sd[s + "mlp.experts.gate_up_proj"], sd[s + "mlp.experts.down_proj"]
        f, per_rank = gate_up.shape[1] // 2, E // ep
        for j in range(per_rank):
            g = ep_rank * per_rank + j  # the global expert id of local expert j
            gate, up = _tp_chunk(gate_up[g, :f], etp, etp_rank, 0), _tp_chunk(gate_up[g, f:], etp, etp_rank, 0)
            put(expert_name(i, g, 1, grouped), Role.EXPERT_GATED_COLUMN, torch.cat([gate, up]), etp_rank, etp)
            put(expert_name(i, g, 2, grouped), Role.EXPERT_ROW, _tp_chunk(down[g], etp, etp_rank, 1), etp_rank, etp)
        if s + "mlp.shared_expert.gate_proj.weight" in sd:
            fc1 = m + "mlp.shared_experts.linear_fc1.weight"
            gated(s + "mlp.shared_expert.", fc1, tp, tp_rank, Role.GATED_MLP_COLUMN)
            fc2 = _tp_chunk(sd[s + "mlp.shared_expert.down_proj.weight"], tp, tp_rank, 1)
            put(m + "mlp.shared_experts.linear_fc2.weight", Role.ROW, fc2, tp_rank, tp)
            put(m + "mlp.shared_experts.gate_weight", Role.REPLICATED, sd[s + "mlp.shared_expert_gate.weight"])
    return out


def trainer(arch: str, *, tp: int, ep: int, etp: int, grouped: bool) -> tuple[list[SourceRecord], dict]:
    """Every rank of the smallest world with this layout: records with real offsets, and their bytes.

    Dense ranks are `tp + TP * dp`, expert ranks `etp + ETP * (ep + EP * edp)` (Megatron-Core's orders).
    """
    world = math.lcm(tp, ep * etp)
    sources, buffers = [], {}
    for rank in range(world):
        coords = dict(tp_rank=rank % tp, tp_size=tp, ep_rank=rank // etp % ep, ep_size=ep)
        shards = rank_shards(
            arch, tp=tp, tp_rank=rank % tp, ep=ep, ep_rank=rank // etp % ep, etp=etp, etp_rank=rank % etp,
            grouped=grouped,
        )  # fmt: skip
        descs, chunks, at = [], [], 0
        for name, (role, local, r, size) in shards.items():
            desc = TensorDesc.shard(
                name=name, role=role, dtype="float32", global_shape=global_shape(local, role, size), rank=r,
                size=size, byte_offset=at,
            )  # fmt: skip
            assert desc.local_shape == tuple(local.shape), name  # the library's formula agrees with the cut
            descs.append(desc)
            chunks.append(local.view(-1).view(torch.uint8))
            at += desc.nbytes
        buffers[rank] = torch.cat(chunks)
        sources.append(
            SourceRecord(
                rank=rank, coords=ParallelCoords(**coords, dp_rank=rank // tp, dp_size=world // tp),
                agent_name=f"a{rank}", agent_metadata=b"", regions=(Region(index=0, addr=4096, nbytes=at),),
                tensors=tuple(descs),
            )
        )  # fmt: skip
    return sources, buffers


def global_shape(local: torch.Tensor, role: Role, size: int) -> tuple[int, ...]:
    shape = list(local.shape)
    if role.partition_dim >= 0:
        shape[role.partition_dim] *= size
    return tuple(shape)


def stage(plan: Plan, buffers: dict[int, torch.Tensor]) -> torch.Tensor:
    """Carry out the plan's reads: block i of a read comes from remote_offset + i * remote_stride."""
    staging = torch.full((plan.staging_bytes,), 0xFF, dtype=torch.uint8)
    for r in plan.reads:
        for i in range(r.count):
            src, dst = r.remote_offset + i * r.remote_stride, r.local_offset + i * r.block_bytes
            staging[dst : dst + r.block_bytes] = buffers[r.rank][src : src + r.block_bytes]
    return staging


def refit(engine: HFEngine, arch: str, sources: list[SourceRecord], buffers: dict) -> Plan:
    """What a receiver does: check the model, plan, check the plan against the engine, stage, install."""
    catalog = meta(arch)
    check_compatible(engine.spec(), catalog)
    plan = plan_refit(model=catalog, sources=sources, layout=engine.spec().layout())
    check_tensors(engine.expected(), {t.hf_name: TensorSpec(shape=t.shape, dtype=t.dtype) for t in plan.targets})
    engine.install(assemble(plan, stage(plan, buffers)))
    return plan


@pytest.mark.parametrize("etp", [1, 2])
@pytest.mark.parametrize("ep", [1, 2])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_trainer_layout_refits_an_hf_moe_model_bit_identically(arch: str, tp: int, ep: int, etp: int) -> None:
    grouped = (tp + ep + etp) % 2 == 1  # both Megatron expert namings, spread over the layouts
    sources, buffers = trainer(arch, tp=tp, ep=ep, etp=etp, grouped=grouped)
    model = build(arch, seed=2)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    engine = HFEngine(model)
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(model.get_parameter(fused), truth(arch).get_parameter(fused))
    plan = refit(engine, arch, sources, buffers)
    gt = dict(truth(arch).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, gt[name]), name
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before  # storage kept
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, truth(arch)(TOKENS).logits)
    # Every expert slice is read from a rank of the EP rank that owns it, once.
    expert_bytes = sum(p.nbytes for p in plan.pieces if ".mlp.experts." in p.tensor)
    assert expert_bytes == sum(t.numel() * 4 for n, t in gt.items() if ".mlp.experts." in n)
    for piece in plan.pieces:
        m = re.search(r"(?:local_experts\.(\d+)\.|weight(\d+)$)", piece.tensor)
        if ".mlp.experts." in piece.tensor:
            owner = int(m[1] or m[2]) // (E // ep)
            assert sources[piece.rank].coords.ep_rank == owner, piece


@pytest.mark.parametrize(("tp", "ep", "etp"), [(1, 2, 1), (2, 2, 2), (2, 1, 2)])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_chunks_copied_out_of_the_trainers_memory_refit_bit_identically(arch: str, tp: int, ep: int, etp: int) -> None:
    # A receiver on the trainers' own GPU (`Receiver.mapped_install`) copies each chunk straight out of
    # their regions into the engine's tensors, the fused experts' views included: no staging at all.
    sources, buffers = trainer(arch, tp=tp, ep=ep, etp=etp, grouped=tp == 2)
    model = build(arch, seed=2)
    engine = HFEngine(model)
    plan = plan_refit(model=meta(arch), sources=sources, layout=engine.spec().layout(), window=16 << 10)
    assert len(plan.chunks) > 2 and not plan.direct
    dests = engine.destinations()
    regions = {(s.rank, r.index): buffers[s.rank] for s in sources for r in s.regions}
    for k in range(len(plan.chunks)):
        ChunkCopier(plan, k, regions, dests).run(None)
    zero_padding(plan.targets, dests)
    gt = dict(truth(arch).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, gt[name]), name
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, truth(arch)(TOKENS).logits)


def test_engine_names_are_views_of_the_fused_experts() -> None:
    model = build("qwen3_moe", seed=3)
    expected, experts = HFEngine(model).expected(), model.model.layers[0].mlp.experts
    assert "model.layers.0.mlp.experts.gate_up_proj" not in expected
    assert expected["model.layers.0.mlp.experts.3.gate_proj.weight"] == TensorSpec(shape=(32, H), dtype="float32")
    assert expected["model.layers.0.mlp.experts.3.down_proj.weight"] == TensorSpec(shape=(H, 32), dtype="float32")
    assert "model.layers.1.mlp.gate_proj.weight" in expected  # the dense layer keeps its own names
    engine = HFEngine(model)
    new = {n: torch.full(s.shape, float(i)) for i, (n, s) in enumerate(engine.expected().items())}
    engine.install(new)
    gate_up = experts.gate_up_proj
    assert torch.equal(gate_up[2, :32], new["model.layers.0.mlp.experts.2.gate_proj.weight"])
    assert torch.equal(gate_up[2, 32:], new["model.layers.0.mlp.experts.2.up_proj.weight"])
    assert torch.equal(experts.down_proj[1], new["model.layers.0.mlp.experts.1.down_proj.weight"])


def test_a_refused_expert_install_changes_nothing() -> None:
    model = build("mixtral", seed=4)
    engine = HFEngine(model)
    old = {n: p.clone() for n, p in model.named_parameters()}
    good = {n: torch.zeros(s.shape) for n, s in engine.expected().items()}
    bad = dict(good, **{"model.layers.1.mlp.experts.3.up_proj.weight": torch.zeros(16, H)})
    with pytest.raises(ModelMismatchError, match=r"experts\.3\.up_proj\.weight: got \(16, 64\)"):
        engine.install(bad)
    missing = {n: t for n, t in good.items() if n != "model.layers.0.mlp.experts.0.down_proj.weight"}
    with pytest.raises(ModelMismatchError, match=r"experts\.0\.down_proj"):
        engine.install(missing)
    # A source that is a view of the engine's own fused experts would be overwritten mid-install.
    fused = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    alias = dict(good, **{"model.layers.0.mlp.experts.0.gate_proj.weight": fused[1, :32]})
    with pytest.raises(ModelMismatchError, match="shares memory"):
        engine.install(alias)
    assert all(torch.equal(p, old[n]) for n, p in model.named_parameters())


def test_the_hf_config_gives_the_expert_count_and_ffns() -> None:
    for arch, ffn, moe_ffn in (("qwen3_moe", 96, 32), ("mixtral", 32, 32), ("qwen2_moe", 96, 32)):
        s = HFEngine(build(arch, seed=5)).spec()
        assert (s.architecture, s.num_experts, s.ffn_hidden_size, s.moe_ffn_hidden_size) == (arch, E, ffn, moe_ffn)
        check_compatible(s, meta(arch))


@pytest.mark.parametrize(
    ("engine", "catalog", "match"),
    [
        ({"num_experts": 0, "moe_ffn_hidden_size": 0}, {}, "num_experts: engine 0 vs catalog 4"),  # dense engine
        ({}, {"num_experts": 0, "moe_ffn_hidden_size": 0}, "num_experts: engine 4 vs catalog 0"),  # dense catalog
        ({"num_experts": 8}, {}, "num_experts: engine 8 vs catalog 4"),
        ({"moe_ffn_hidden_size": 64}, {}, "moe_ffn_hidden_size: engine 64 vs catalog 32"),
        ({"num_experts": 0, "ep_size": 3}, {}, "engine EP size 3 does not divide the catalog's 4 experts"),
    ],
)
def test_a_mismatched_moe_model_is_refused_naming_the_field(engine: dict, catalog: dict, match: str) -> None:
    import dataclasses

    m = meta("qwen3_moe")
    with pytest.raises(ModelMismatchError, match=match):
        check_compatible(EngineSpec.from_meta(m, **engine), dataclasses.replace(m, **catalog))


def test_an_engine_ep_that_does_not_divide_the_experts_is_refused() -> None:
    with pytest.raises(ConfigError, match="engine ep_size 3 does not divide its num_experts 4"):
        EngineSpec.from_meta(meta("mixtral"), ep_size=3)
    EngineSpec.from_meta(meta("mixtral"), ep_rank=1, ep_size=2)


def test_a_dense_engine_refuses_a_moe_catalog_before_any_pull() -> None:
    sources, buffers = trainer("qwen3_moe", tp=1, ep=1, etp=1, grouped=False)
    dense = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            **{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}, intermediate_size=96
        )
    )
    old = {n: p.clone() for n, p in dense.named_parameters()}
    with pytest.raises(ModelMismatchError, match="num_experts: engine 0 vs catalog 4"):
        refit(HFEngine(dense), "qwen3_moe", sources, buffers)
    assert all(torch.equal(p, old[n]) for n, p in dense.named_parameters())


def test_qwen2_moe_shared_expert_names() -> None:
    name = "decoder.layers.2.mlp.shared_experts."
    assert hf_names(name + "linear_fc1.weight", architecture="qwen2_moe") == (
        "model.layers.2.mlp.shared_expert.gate_proj.weight",
        "model.layers.2.mlp.shared_expert.up_proj.weight",
    )
    assert hf_names(name + "gate_weight", architecture="qwen2_moe") == ("model.layers.2.mlp.shared_expert_gate.weight",)
    assert hf_names(name + "linear_fc2.weight") == ("model.layers.2.mlp.shared_experts.down_proj.weight",)  # DeepSeek


def test_fused_experts_of_an_unknown_layout_are_refused() -> None:
    model = build("qwen3_moe", seed=6)
    model.model.layers[0].mlp.experts.is_transposed = True  # [E, H, 2F], as some architectures store them
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.experts\.gate_up_proj: fused experts laid out as"):
        HFEngine(model)
