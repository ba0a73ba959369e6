"""The test process's side of the Megatron DDP publisher tests: a receiver, the checks of every version.

`train_and_pull` drives trainer ranks running tests/support/ddp_ops.py (CPU gloo or GPU NCCL): it
builds the DDP-wrapped chunks with the order probe, trains and publishes each version, and checks
(1) the forced gather: stale peer shards before `stream_weights` exactly when `overlap_param_gather`
defers the gather, none after, no gather left for the next forward, which starts none and changes no
byte; (2) the order: every write of parameter bytes (the optimizer's shard copy, each bucket group's
all-gather, in the step or in the publisher) came after the last version was RETIRED in the real
catalog; (3) the bytes: version 0, published before any step, is the HF model every rank started
from (through the test's converter), pulled into a receiver's HF tensors bit for bit; after each
step, that receiver's HF tensors, converted back to each chunk's Megatron layout by the test's own
converter, equal the all-gathered truth bit for bit, every layer covered.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.support import ddp_ops
from tests.support import hf_models as hm
from tests.support.cluster import TrainerCluster

CASE = ddp_ops.CASE


def train_and_pull(
    cluster: TrainerCluster,
    catalog: str,
    *,
    name: str,
    overlap: bool,
    cuda: bool,
    receiver_device: torch.device,
    versions: tuple[int, ...] = (1, 2),
    **layout: int,
) -> None:
    """Build, then per version: train a step, publish, check order and staleness, pull and compare."""
    built = cluster.run("tests.support.ddp_ops:build", timeout_s=300, catalog=catalog, name=name, overlap=overlap,
                        cuda=cuda, order_probe=True, **layout)  # fmt: skip
    for b in built:
        assert b["dp_size"] == 2
        assert b["param_storages"] == 0  # every parameter is a view of a DDP param buffer
        # The buffers are registered as they are, not copied (and the rank's version words once).
        assert b["registrations"] == b["buffers"] + 1
        if overlap:
            assert b["bucket_groups"][0] > 1  # several all-gathers, chained by the pre-hooks
    rcv = None
    try:
        # Version 0: the weights as built from the HF model, before any step. The receiver's HF tensors
        # must be the HF model's own, bit for bit (no converter on this side of the comparison).
        initial = cluster.run("tests.support.ddp_ops:publish_initial", timeout_s=120, version=0)
        assert [r["stale_before"] for r in initial] == [0] * len(initial)  # DDP's buffers start in sync
        rcv = receiver(catalog, name, 0, receiver_device)
        assert rcv.update_weights(version=0).version == 0
        assert differing_from_hf(rcv) == []
        for version in versions:
            ranks = cluster.run("tests.support.ddp_ops:step", timeout_s=300, version=version)
            for r, b in zip(ranks, built, strict=True):
                # With the gather deferred, each rank's buffers hold its peer's shards from before the
                # step: what publishing without the forced gather would expose.
                assert (r["stale_before"] > 0) == overlap, r["stale_before"]
                assert r["stale_after"] == 0
                assert r["pending_gathers"] == []
                check_order(r, overlap=overlap, gathers=sum(b["bucket_groups"]))
            assert any(r["state"] == "READY" for r in ranks)  # the last rank to publish made it READY
            try:
                assert rcv.update_weights(version=version).version == version
            except Exception:
                print_regions(catalog, name, version)  # shown with the failure: what each rank registered
                raise
            assert differing(rcv, [r["truth"] for r in ranks]) == [], f"v{version}: pulled bytes differ"
            # The next forward uses these bytes as they are: its pre-hooks start no all-gather.
            for g in cluster.run("tests.support.ddp_ops:forward_gathers", timeout_s=120):
                assert g == {"started": [], "changed": 0}
    finally:
        if rcv is not None:
            rcv.close()
        cluster.run("tests.support.ddp_ops:close", timeout_s=60)


def check_order(r: dict, *, overlap: bool, gathers: int) -> None:
    """Every write of parameter bytes came after the version last published was RETIRED in the catalog."""
    step, publish = r["step_writes"], r["publish_writes"]
    assert {state for _, state in step + publish} == {"RETIRED"}, (step, publish)
    assert any(w.startswith("shard write") for w, _ in step)  # the optimizer's copy into the bf16 shards
    step_gathers = [w for w, _ in step if w.startswith("gather")]
    publish_gathers = [w for w, _ in publish if w.startswith("gather")]
    # overlap_param_gather: the publisher forces the deferred all-gather of every bucket group of
    # every chunk; otherwise the step gathered them all and the publisher gathers nothing.
    assert (len(publish_gathers), len(step_gathers)) == ((gathers, 0) if overlap else (0, gathers))


def differing_from_hf(rcv: Any) -> list[str]:
    """Names whose pulled bytes differ from the HF model every trainer rank started from (or are missing)."""
    hf = hm.build_hf_model(CASE, seed=ddp_ops.HF_SEED).state_dict()
    got = {k: v.cpu() for k, v in rcv.engine.tensors.items()}
    if sorted(got) != sorted(hf):
        return [f"{k} (names differ)" for k in sorted(set(got) ^ set(hf))]
    # The local spec keeps norms in fp32: the pulled norm is the HF bf16 value widened, exactly.
    return [k for k, v in hf.items() if not torch.equal(ddp_ops.bits(got[k]), ddp_ops.bits(v.to(got[k].dtype)))]


def print_regions(catalog: str, name: str, version: int) -> None:
    from refit.catalog.client import CatalogClient

    with CatalogClient(catalog) as client:
        for source in client.get_sources(name=name, version=version):
            for g in source.regions:
                print(f"rank {source.rank} region {g.index}: {g.addr:#x}+{g.nbytes} on {g.device}:{g.device_id}")


def receiver(catalog: str, name: str, version: int, device: torch.device, **kwargs: Any) -> Any:
    """A TP1 Receiver whose engine holds the HF tensors the catalog's version describes (`kwargs`: more
    of the Receiver's arguments)."""
    from refit import Receiver
    from refit.catalog.client import CatalogClient
    from refit.engines.base import EngineSpec, TensorSpec
    from refit.plan import cost
    from refit.plan.planner import plan_refit
    from refit_bench.refit_ranks import BufferEngine  # the bench's engine of plain tensors

    with CatalogClient(catalog) as client:
        info = client.wait_ready(name=name, version=version, timeout_s=60)
        sources = client.get_sources(name=name, version=version)
    spec = EngineSpec.from_meta(info.model, tp_rank=0, tp_size=1)
    targets = plan_refit(model=info.model, sources=sources, layout=spec.layout()).targets
    shapes = {t.hf_name: TensorSpec(shape=t.shape, dtype=t.dtype) for t in targets}
    link = cost.GPU_LOCAL if device.type == "cuda" else cost.CPU_UCX
    return Receiver(catalog=catalog, engine=BufferEngine(spec, shapes, device), name=name, timeout_s=120,
                    link_cost=link, **kwargs)  # fmt: skip


def differing(rcv: Any, truths: list[list[dict] | None]) -> list[str]:
    """Names whose pulled bytes differ from the truth, per chunk of every rank that sent one.

    The receiver's HF tensors go back to each chunk's Megatron layout (its TP rank, global layers, first
    and last stage) through the test's own converter; every parameter of every layer must be covered.
    """
    from tests.support.megatron_convert import hf_to_megatron_local

    hf = {k: v.cpu() for k, v in rcv.engine.tensors.items()}
    bad: list[str] = []
    covered: set[int] = set()
    for chunks in (t for t in truths if t is not None):
        for c in chunks:
            got = hf_to_megatron_local(hf, CASE, tp_size=c["tp_size"], tp_rank=c["tp_rank"], layers=c["layers"],
                                       pre_process=c["pre_process"], post_process=c["post_process"],
                                       padded_vocab=hm.padded_vocab(CASE, c["tp_size"]))  # fmt: skip
            where = f"tp{c['tp_rank']} layers {c['layers']}"
            if sorted(got) != sorted(c["params"]):
                bad += [f"{where}: {k} (names differ)" for k in sorted(set(got) ^ set(c["params"]))]
                continue
            same = {k: torch.equal(ddp_ops.bits(got[k]), ddp_ops.bits(v)) for k, v in c["params"].items()}
            bad += [f"{where}: {k}" for k, ok in same.items() if not ok]
            covered.update(c["layers"])
    if covered != set(range(CASE.num_layers)):
        bad.append(f"layers {sorted(set(range(CASE.num_layers)) - covered)} have no truth")
    return bad
