"""Resolve and GetSources filtered to the trainer ranks an engine rank's plan reads.

Catalog level (both stores): `ranks=` returns exactly those ranks' records, in one read. End to end: an
engine rank of a TP2 Megatron engine refitting from a TP2 x DP4 trainer (8 ranks) resolves in full
once, then, its plan cached under the layout digest, receives only the records of the trainer ranks
its plan reads, without tensors, and stays bit-exact against the HF ground truth.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from refit.catalog.client import CatalogClient
from refit.errors import ConfigError
from tests.support import catalog_samples as samples
from tests.support import hf_models as hm
from tests.support.cluster import TrainerCluster
from tests.support.refit_harness import OPS, write_state

ENGINE = "tests.support.engine_ops"
WORLD = 4


def test_resolve_and_get_sources_return_only_the_ranks_asked_for(catalog_client: CatalogClient) -> None:
    full = [samples.source(r, tp_size=WORLD) for r in range(WORLD)]
    for s in full:
        catalog_client.publish(name="m", version=1, world_size=WORLD, model=samples.MODEL, source=s)
    everything = catalog_client.resolve(name="m")
    assert everything.sources == tuple(full)

    some = catalog_client.resolve(name="m", ranks=[3, 1])
    assert some.sources == (full[1], full[3])
    assert some.info == everything.info and some.info.published_ranks == (0, 1, 2, 3)
    assert some.layout_digest == everything.layout_digest and not some.tensors_omitted

    heads = catalog_client.resolve(name="m", known_layout=everything.layout_digest, ranks=[2])
    assert heads.tensors_omitted and [s.rank for s in heads.sources] == [2] and heads.sources[0].tensors == ()
    assert heads.sources[0].regions == full[2].regions

    assert catalog_client.get_sources(name="m", version=1, ranks=[0, 2, 2]) == [full[0], full[2]]
    assert catalog_client.get_sources(name="m", version=1, ranks=[]) == full
    # A rank the version lacks is left out, not an error.
    assert catalog_client.get_sources(name="m", version=1, ranks=[1, 9]) == [full[1]]
    assert catalog_client.resolve(name="m", version=1, ranks=[9]).sources == ()


@pytest.mark.parametrize("ranks", [[-1], [0, -3], ["0"], [True], "01"])
def test_bad_ranks_are_refused_before_a_round_trip(catalog_client: CatalogClient, ranks: object) -> None:
    with pytest.raises(ConfigError, match="ranks must be ints >= 0"):
        catalog_client.resolve(name="m", ranks=ranks)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ranks must be ints >= 0"):
        catalog_client.get_sources(name="m", version=1, ranks=ranks)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine_cluster() -> Iterator[TrainerCluster]:
    with TrainerCluster(world_size=2, timeout_s=300.0) as cluster:
        yield cluster


def test_second_refit_fetches_only_the_ranks_the_plan_reads(trainer, catalog, engine_cluster, tmp_path) -> None:
    case = hm.LLAMA_GQA
    t = trainer(case, tp=2, pp=1)  # 8 trainer ranks: TP2 x DP4
    garbage = write_state(hm.build_hf_model(case, seed=42), tmp_path / "engine-init.safetensors")
    truth1 = write_state(t.hf, tmp_path / "truth1.safetensors")
    engine_cluster.run(f"{ENGINE}:build_pair", case=case.id, init_path=str(garbage), truth_path=str(truth1), tp=2)
    try:
        t.publish(1)
        first = engine_cluster.run(f"{ENGINE}:refit_kept", catalog=catalog, name=t.name)
        for out in first:  # no plan yet: every rank's full record
            assert out["version"] == 1 and out["differ"] == []
            assert out["source_ranks"] == list(range(8)) and out["with_tensors"]

        v2 = t.step(seed=2)
        t.cluster.run(f"{OPS}:invalidate", name=t.name)
        t.publish(2)
        engine_cluster.run(
            "tests.support.trainer_ops:load", key="truth", hf_path=str(write_state(v2, tmp_path / "truth2.safetensors"))
        )
        second = engine_cluster.run(f"{ENGINE}:refit_kept", catalog=catalog, name=t.name)
        for engine_rank, out in enumerate(second):
            assert out["version"] == 2 and out["differ"] == [], out["differ"]
            # Only the ranks this engine rank's plan reads, without tensor descriptors.
            assert out["source_ranks"] == out["plan_ranks"] and not out["with_tensors"]
            assert len(out["source_ranks"]) < 8, out
            print(f"engine rank {engine_rank}: second refit fetched trainer ranks {out['source_ranks']} of 8")
    finally:
        engine_cluster.run(f"{ENGINE}:close_receivers")
