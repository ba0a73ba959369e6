"""Digests on real parts: trainer ranks publish block digests of their shards, receivers verify what
they pulled before installing it (docs/reliability.md, "Digests").

A byte of a trainer rank's registered memory is flipped after it published (the version stays
READY): the receiver names the tensor and the rank, installs nothing (whole) or says it is torn
(streamed), and a fresh version refits bit-exact. Engine TP2 over trainer TP1 verifies slices.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from refit import Receiver
from refit.catalog.client import CatalogClient
from refit.dtypes import torch_dtype
from refit.engines import HFEngine
from refit.engines.base import EngineSpec, TensorSpec, install_tensors, specs_of
from refit.errors import ConfigError, DigestError
from refit.plan.planner import plan_refit
from tests.integration.test_refit_safety import Race, WholeEngine, assert_unchanged, snapshot
from tests.support import hf_models as hm
from tests.support.refit_harness import OPS, assert_same_weights

WINDOW = 64 << 10
FC2 = "layers.0.mlp.linear_fc2.weight"  # row-parallel: column blocks
QKV = "layers.1.self_attention.linear_qkv.weight"  # column-parallel: row blocks


def _corrupt(t: Any, version: int, tensor: str) -> str:
    """Flip a byte of `tensor` on every trainer rank (each DP replica: whichever a receiver reads)."""
    ranks = list(range(t.cluster.world_size))
    out = t.cluster.run(f"{OPS}:corrupt", catalog=t.catalog, name=t.name, version=version, tensor=tensor, ranks=ranks)
    return next(name for name in out if name)


def _next(t: Any, version: int, **publish: Any) -> torch.nn.Module:
    truth = t.step(seed=version)
    if not publish.get("snapshots"):
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
    t.publish(version, **publish)
    return truth


def test_a_corrupted_shard_is_refused_and_a_whole_install_keeps_the_old_weights(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    t.publish(1)
    with Receiver(catalog=catalog, engine=WholeEngine(HFEngine(engine_model)), name=t.name) as rcv:
        r1 = rcv.update_weights()
        assert_same_weights(engine_model, t.hf)
        # TP2 -> TP1 reads whole shards: every byte pulled was verified.
        assert rcv.stats.verified_bytes >= r1.bytes and rcv.stats.unverified_bytes == 0
        assert r1.timings["verify"] > 0

        _next(t, 2)
        name = _corrupt(t, 2, FC2)
        before = snapshot(engine_model)
        with pytest.raises(DigestError, match=rf"{name} from trainer rank \d") as err:
            rcv.update_weights()  # unpinned, but no newer version: the same bytes would fail again
        assert (err.value.tensor, err.value.version) == (name, 2) and err.value.rank >= 0
        assert_unchanged(engine_model, before)
        assert not rcv.torn

        v3 = _next(t, 3)
        assert rcv.update_weights().version == 3
        assert_same_weights(engine_model, v3)


def test_a_corrupted_streamed_refit_is_torn_then_healed_and_the_knob_turns_it_off(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=1, pp=1)  # TP1 -> TP1: large tensors are read straight into the engine
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    t.publish(1)
    kwargs = dict(catalog=catalog, name=t.name, max_staging_bytes=WINDOW, direct_min_bytes=1 << 14)
    with Receiver(engine=HFEngine(engine_model), **kwargs) as rcv:
        r1 = rcv.update_weights()
        assert 0 < r1.direct_bytes < r1.bytes  # direct reads and staged chunks: both are verified
        assert rcv.stats.unverified_bytes == 0 and rcv.stats.verified_bytes >= r1.bytes
        for version, tensor in ((2, QKV), (3, "layers.0.input_layernorm.weight")):  # a direct read, a staged one
            _next(t, version)
            name = _corrupt(t, version, tensor)
            with pytest.raises(DigestError, match=rf"{name} from trainer rank \d.*mixed"):
                rcv.update_weights()
            assert rcv.torn
        v4 = _next(t, 4)
        assert rcv.update_weights().version == 4 and not rcv.torn
        assert_same_weights(engine_model, v4)

    # verify_digests=False installs what it pulled, corrupted or not: the check is what refused it.
    v5 = _next(t, 5)
    name = _corrupt(t, 5, FC2)
    with Receiver(engine=HFEngine(engine_model), verify_digests=False, **kwargs) as rcv:
        assert rcv.update_weights().version == 5
        assert rcv.stats.verified_bytes == 0
        differ = [n for n, p in engine_model.named_parameters() if not torch.equal(p, dict(v5.named_parameters())[n])]
        assert differ and all("layers.0.mlp.down_proj" in n for n in differ), (name, differ)

        # The knob is read at each fetch: turned on, the same receiver refuses the next corrupted version.
        with pytest.raises(ConfigError, match="verify_digests"):
            rcv.verify_digests = 1  # type: ignore[assignment]
        rcv.verify_digests = True
        _next(t, 6)
        name = _corrupt(t, 6, FC2)
        with pytest.raises(DigestError, match=rf"{name} from trainer rank \d"):
            rcv.update_weights()


def test_an_unpinned_refit_of_a_corrupted_version_pulls_the_newer_one(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=2, pp=1)
    engine_model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    t.publish(1, snapshots=2)
    _next(t, 2, snapshots=2)
    _corrupt(t, 2, QKV)  # in version 2's snapshot slot; version 2 stays READY
    race, truth = Race(), {}

    def publish_v3() -> None:  # lands in version 1's slot: version 2 stays READY (and corrupted)
        truth[3] = _next(t, 3, snapshots=2)

    race.step = publish_v3
    engine = WholeEngine(HFEngine(engine_model))
    with Receiver(catalog=catalog, engine=engine, name=t.name, on_after_wire=race) as rcv:
        assert rcv.update_weights().version == 3
        assert race.versions == [2, 3]
        assert_same_weights(engine_model, truth[3])


class SliceEngine:
    """An engine rank at its own TP that is just the tensors it serves (the planner's targets)."""

    def __init__(self, catalog: str, name: str, *, tp_rank: int, tp_size: int) -> None:
        with CatalogClient(catalog) as client:
            info = client.wait_ready(name=name, version=1, timeout_s=60)
            sources = client.get_sources(name=name, version=1)
        self._spec = EngineSpec.from_meta(info.model, tp_rank=tp_rank, tp_size=tp_size)
        targets = plan_refit(model=info.model, sources=sources, layout=self._spec.layout()).targets
        self.tensors = {t.hf_name: torch.zeros(t.shape, dtype=torch_dtype(t.dtype)) for t in targets}

    def spec(self) -> EngineSpec:
        return self._spec

    def expected(self) -> dict[str, TensorSpec]:
        return specs_of(self.tensors)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def destinations(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def install(self, tensors: dict[str, torch.Tensor]) -> None:
        install_tensors(self.tensors, tensors)


def test_engine_tp_above_trainer_tp_verifies_the_slices_each_rank_reads(trainer, catalog) -> None:
    t = trainer(hm.LLAMA_GQA, tp=1, pp=1)
    t.publish(1)
    engines = [SliceEngine(catalog, t.name, tp_rank=r, tp_size=2) for r in range(2)]
    rcvs = [Receiver(catalog=catalog, engine=e, name=t.name, max_staging_bytes=WINDOW) for e in engines]
    try:
        for rcv in rcvs:
            r1 = rcv.update_weights()
            # Row ranges, per-query-group QKV rows and column slices all fall on block boundaries.
            assert rcv.stats.unverified_bytes == 0 and rcv.stats.verified_bytes >= r1.bytes
        # The flipped byte sits in row outer/2, column 1 of the fc2 shard: engine rank 0's columns only.
        _next(t, 2)
        name = _corrupt(t, 2, FC2)
        with pytest.raises(DigestError, match=rf"{name} from trainer rank \d"):
            rcvs[0].update_weights()
        assert rcvs[0].torn
        assert rcvs[1].update_weights().version == 2  # its slice of the same shard is intact
        _next(t, 3)
        for rcv in rcvs:
            assert rcv.update_weights().version == 3 and not rcv.torn
    finally:
        for rcv in rcvs:
            rcv.close()
