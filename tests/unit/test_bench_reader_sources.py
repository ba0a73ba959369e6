"""`refit-bench plan --from-reader`: trainer descriptors read by refit.megatron's reader from a real
meta-device megatron-core GPTModel, against the synthetic generator's, on the tiny DeepSeek-V3 config.

The two agree on every tensor's bytes, shape, dtype, stage and expert, and on every rank's descriptor
count. The differences are the ones the reader module documents, each asserted here:
* names: the local spec's separate norms and SequentialMLP experts vs the TE spec's fused
  `layer_norm_weight` and TEGroupedMLP `weight{e}` the synthetic generator writes (canonicalised below);
* the q / kv down projections: column-parallel in the local spec (split over trainer TP), replicated
  in the synthetic (TE) form, so at TP > 1 a rank publishes its slice instead of a copy.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from refit.dtypes import DTYPE_SIZES
from refit.types import Role
from refit_bench.cli import main
from refit_bench.reader_sources import read_tensors, reader_sources
from refit_bench.trainer_sources import TrainerLayout, global_tensors, load_config, synthesize_sources

pytest.importorskip("megatron.core")

_DOWN = ("linear_q_down_proj.weight", "linear_kv_down_proj.weight")


def _canonical(name: str) -> str:
    """A synthetic (TE-spec) name in the local spec's form the reader reports."""
    name = name.replace("linear_q_up_proj.layer_norm_weight", "q_layernorm.weight")
    name = name.replace("linear_kv_up_proj.layer_norm_weight", "kv_layernorm.weight")
    name = name.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
    return re.sub(r"experts\.linear_fc([12])\.weight(\d+)$", r"experts.local_experts.\2.linear_fc\1.weight", name)


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * DTYPE_SIZES[dtype]


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_config("tiny-mla-moe")


@pytest.mark.parametrize("linear_dtype", [None, "float8_e4m3fn"])
def test_global_tensors_agree(cfg: dict, linear_dtype: str | None) -> None:
    meta, read = read_tensors(cfg, tp=2, pp=2, linear_dtype=linear_dtype)
    synth = {_canonical(t.name): t for t in global_tensors(cfg, 2, linear_dtype=linear_dtype)}
    assert len(read) == len(synth)
    assert meta.multi_latent_attention and meta.q_lora_rank == cfg["q_lora_rank"]
    assert meta.padded_vocab_size == 1024  # 1000 padded to 128 * TP2
    for t in read:
        s = synth[t.name]
        assert (t.dtype, t.stage, t.expert) == (s.dtype, s.stage, s.expert), t.name
        # Synthetic vocab tables are padded for TP1 (shard_sources repads them per layout).
        assert t.shape == s.shape or t.role is Role.VOCAB_PARALLEL, t.name
        if t.name.endswith(_DOWN):
            assert (t.role, s.role) == (Role.COLUMN, Role.REPLICATED), t.name
        else:
            assert t.role is s.role, t.name
    expert_bias = [t for t in read if t.name.endswith("router.expert_bias")]
    assert expert_bias and all(t.dtype == "float32" for t in expert_bias)


@pytest.mark.parametrize(
    "layout",
    [
        TrainerLayout(tp=1, pp=2, ep=2, dp=2, gpus_per_node=4),
        TrainerLayout(tp=2, pp=2, ep=2, dp=2, gpus_per_node=4),
        TrainerLayout(tp=2, pp=2, ep=2, dp=2, gpus_per_node=4, row_blocks=2),
    ],
    ids=lambda layout: layout.describe(),
)
def test_rank_descriptors_agree(cfg: dict, layout: TrainerLayout) -> None:
    meta_r, read, _ = reader_sources(cfg, layout)
    meta_s, synth = synthesize_sources(cfg, layout)
    assert meta_r == meta_s
    assert [s.coords for s in read] == [s.coords for s in synth]
    for r, s in zip(read, synth, strict=True):
        assert len(r.tensors) == len(s.tensors), r.rank
        assert _placements(r.tensors, canonical=False) == _placements(s.tensors, canonical=True), r.rank
        down_r = [d for d in r.tensors if d.name.endswith(_DOWN)]
        down_s = [d for d in s.tensors if d.name.endswith(_DOWN)]
        assert [d.name for d in down_r] == [d.name for d in down_s]
        # Each down projection: the rank's 1/TP row slice (reader) instead of the whole copy (synthetic).
        for dr, ds in zip(down_r, down_s, strict=True):
            assert (ds.role, ds.local_shape) == (Role.REPLICATED, ds.global_shape)
            assert dr.role is Role.COLUMN and dr.global_shape == ds.global_shape
            assert dr.nbytes * layout.tp == ds.nbytes
        saved = sum(d.nbytes for d in down_s) - sum(d.nbytes for d in down_r)
        assert sum(d.nbytes for d in r.tensors) == sum(d.nbytes for d in s.tensors) - saved
        assert r.regions[0].nbytes == s.regions[0].nbytes - saved
        assert (saved == 0) == (layout.tp == 1)


def _placements(descs: tuple, *, canonical: bool) -> list[tuple]:
    """What a planner reads of each descriptor but its name's spelling and byte offset, down projections aside."""
    return sorted(
        (_canonical(d.name) if canonical else d.name, d.role.value, d.dtype, d.global_shape, d.local_shape,
         d.partition_dim, d.partition_stride, d.offset)
        for d in descs
        if not d.name.endswith(_DOWN)
    )  # fmt: skip


@pytest.mark.parametrize("scheme", ["megatron", "hf"])
def test_plan_from_reader(tmp_path: Path, cfg: dict, scheme: str) -> None:
    """`refit-bench plan --from-reader` on the smoke presets. The trainer publishes less (down projections
    sliced over its TP2) in as many descriptors. A Megatron-named engine follows the trainer's split of
    the down projections, so each engine rank needs its 1/TP slice instead of the whole tensor; an HF-named
    engine (vLLM) keeps them whole whatever the trainer does, and needs the same bytes either way."""
    docs = {}
    for mode, extra in (("synthetic", []), ("reader", ["--from-reader"])):
        out = tmp_path / f"{mode}.json"
        argv = ["plan", "--preset", "smoke", "smoke-dense", "--scheme", scheme, "--no-progress", "--json", str(out)]
        assert main([*argv, *extra]) == 0
        docs[mode] = json.loads(out.read_text())["results"]
    down = sum(_nbytes(t.shape, t.dtype) for t in global_tensors(cfg, 1) if t.name.endswith(_DOWN))
    for synth, read in zip(docs["synthetic"], docs["reader"], strict=True):
        assert (synth["trainer_sources"], read["trainer_sources"]) == ("synthetic", "reader")
        assert read["model_bytes"] == synth["model_bytes"]
        assert read["trainer_descriptors"] == synth["trainer_descriptors"]
        assert read["trainer_published_bytes"] < synth["trainer_published_bytes"]
        engine = synth["engine"]
        saved = engine["replicas"] * (engine["tp"] - 1) * down if scheme == "megatron" else 0
        for rs, rr in zip(synth["rows"], read["rows"], strict=True):
            assert rs["needed_bytes"] - rr["needed_bytes"] == saved
            assert rs["target_bytes"] - rr["target_bytes"] == saved


def test_from_reader_refuses_a_gqa_model() -> None:
    with pytest.raises(SystemExit, match="not a multi-latent attention model"):
        main(["plan", "--model", "llama-3-70b", "--from-reader", "--no-progress"])
