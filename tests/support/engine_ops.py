"""Engine-side operations for a cluster of Megatron *inference* ranks (run by `TrainerCluster.run`).

Each engine rank builds two GPTModels at the engine's own TP: the engine (loaded with unrelated
weights) and the ground truth (the HF source model converted at this TP by the test's converter).
After a refit the engine's parameters must equal the ground truth's, bit for bit.

`one_process_world` and `gpt_model` build a GPTModel in the test process itself (TP 1, a gloo world
of one), for engine tests that need no cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from tests.support import hf_models as hm
from tests.support import trainer_ops


@contextlib.contextmanager
def one_process_world() -> Iterator[None]:
    """A torch.distributed world of this process alone, with Megatron's parallel state at TP = PP = 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ps.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def gpt_model(case: hm.ModelCase, **config_overrides: Any) -> Any:
    """A megatron-core GPTModel of `case` at TP 1 on the CPU (random weights); needs `one_process_world`."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    config = trainer_ops.transformer_config(case, tp=1, pp=1, vpp=None, params_dtype=torch.float32)
    config = dataclasses.replace(config, **config_overrides)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=hm.padded_vocab(case, 1),
        max_sequence_length=64,
        position_embedding_type="rope",
    )


def build_pair(
    state: dict, rank: int, world_size: int, *, case: str, init_path: str, truth_path: str, tp: int, ep: int = 1,
    etp: int | None = None,
) -> int:  # fmt: skip
    """The engine (from `init_path`) and the ground truth (from `truth_path`) at TP x EP x ETP."""
    for key, path in (("engine", init_path), ("truth", truth_path)):
        state.pop(key, None)
        state.pop(f"{key}/meta", None)
        trainer_ops.build(state, rank, world_size, key=key, case=case, hf_path=path, tp=tp, ep=ep, etp=etp)
    return sum(p.numel() for p in _model(state, "engine").parameters())


def _model(state: dict, key: str) -> Any:
    value = state[key]
    return value[0] if isinstance(value, list) else value


def _state(model: Any) -> dict[str, Any]:
    """Parameters and persistent buffers (the routers' `expert_bias`, which a refit carries with the
    weights), without Megatron's `_extra_state` entries (not tensors)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


def refit_and_compare(
    state: dict,
    rank: int,
    world_size: int,
    *,
    catalog: str,
    name: str,
    version: int | None = None,
    max_staging_bytes: int | None = None,
    direct_min_bytes: int | None = None,
) -> dict[str, Any]:
    """Refit the engine through refit; report bytes, kept storage and every state entry that differs."""
    import torch
    from megatron.core import parallel_state as ps

    from refit import Receiver
    from refit.engines import MegatronEngine

    engine, truth = _model(state, "engine"), _model(state, "truth")
    ptrs = {n: t.data_ptr() for n, t in _state(engine).items()}
    replica = ps.get_data_parallel_rank()
    with Receiver(catalog=catalog, engine=MegatronEngine(engine), name=name, replica=replica,
                  max_staging_bytes=max_staging_bytes, direct_min_bytes=direct_min_bytes) as rcv:  # fmt: skip
        result = rcv.update_weights(version)
        peak = rcv.stats.peak_staging_bytes
    got, want = _state(engine), _state(truth)
    differ = sorted(set(got) ^ set(want)) + [n for n in got if n in want and not torch.equal(got[n], want[n])]
    return {
        "version": result.version,
        "bytes": result.bytes,
        "differ": differ,
        "storage_kept": ptrs == {n: t.data_ptr() for n, t in _state(engine).items()},
        "tensors": result.num_tensors,
        "param_bytes": sum(p.numel() * p.element_size() for p in engine.parameters()),
        "state_bytes": sum(t.numel() * t.element_size() for t in got.values()),
        "biases": sum(n.endswith(".router.expert_bias") for n in got),
        "chunks": result.chunks,
        "direct_bytes": result.direct_bytes,
        "peak_staging_bytes": peak,
    }


def logits_equal(state: dict, rank: int, world_size: int) -> bool:
    """The refitted engine and the ground truth produce identical logits (checked on TP rank 0)."""
    import torch

    tokens = [[1, 5, 9, 2, 7, 3, 11, 4]]
    got = trainer_ops.logits(state, rank, world_size, key="engine", tokens=tokens)
    want = trainer_ops.logits(state, rank, world_size, key="truth", tokens=tokens)
    return got is None or bool(torch.equal(got, want))


def refit_kept(state: dict, rank: int, world_size: int, *, catalog: str, name: str) -> dict[str, Any]:
    """Refit through one Receiver kept in this rank's state across calls (its cached plan lives on);
    report what the catalog sent (the sources' ranks, whether they carried tensors) and what differs."""
    import torch
    from megatron.core import parallel_state as ps

    from refit import Receiver
    from refit.engines import MegatronEngine

    engine, truth = _model(state, "engine"), _model(state, "truth")
    key = f"receiver/{name}"
    if key not in state:
        replica = ps.get_data_parallel_rank()
        state[key] = Receiver(catalog=catalog, engine=MegatronEngine(engine), name=name, replica=replica)
    rcv = state[key]
    staged = rcv.fetch()
    result = rcv.install(staged)
    got, want = _state(engine), _state(truth)
    differ = sorted(set(got) ^ set(want)) + [n for n in got if n in want and not torch.equal(got[n], want[n])]
    return {
        "version": result.version,
        "differ": differ,
        "source_ranks": [s.rank for s in staged.sources],
        "with_tensors": any(s.tensors for s in staged.sources),
        "plan_ranks": sorted(rcv.plan.bytes_by_rank),
    }


def close_receivers(state: dict, rank: int, world_size: int) -> int:
    keys = [k for k in state if isinstance(k, str) and k.startswith("receiver/")]
    for k in keys:
        state.pop(k).close()
    return len(keys)
