"""Engine-side operations for a cluster of Megatron *inference* ranks (run by `TrainerCluster.run`).

Each engine rank builds two GPTModels at the engine's own TP: the engine (loaded with unrelated
weights) and the ground truth (the HF source model converted at this TP by the test's converter).
After a refit the engine's parameters must equal the ground truth's, bit for bit.
"""

from __future__ import annotations

from typing import Any

from tests.support import trainer_ops


def build_pair(state: dict, rank: int, world_size: int, *, case: str, init_path: str, truth_path: str, tp: int) -> int:
    for key, path in (("engine", init_path), ("truth", truth_path)):
        state.pop(key, None)
        state.pop(f"{key}/meta", None)
        trainer_ops.build(state, rank, world_size, key=key, case=case, hf_path=path, tp=tp)
    return sum(p.numel() for p in _model(state, "engine").parameters())


def _model(state: dict, key: str) -> Any:
    value = state[key]
    return value[0] if isinstance(value, list) else value


def refit_and_compare(
    state: dict, rank: int, world_size: int, *, catalog: str, name: str, version: int | None = None
) -> dict[str, Any]:
    """Refit the engine through refit; report bytes, kept storage and every parameter that differs."""
    import torch
    from megatron.core import parallel_state as ps

    from refit import Receiver
    from refit.engines import MegatronEngine

    engine, truth = _model(state, "engine"), _model(state, "truth")
    ptrs = {n: p.data_ptr() for n, p in engine.named_parameters()}
    replica = ps.get_data_parallel_rank()
    with Receiver(catalog=catalog, engine=MegatronEngine(engine), name=name, replica=replica) as rcv:
        result = rcv.update_weights(version)
    want = dict(truth.named_parameters())
    differ = [n for n, p in engine.named_parameters() if not torch.equal(p, want[n])]
    return {
        "version": result.version,
        "bytes": result.bytes,
        "differ": differ,
        "storage_kept": ptrs == {n: p.data_ptr() for n, p in engine.named_parameters()},
        "tensors": result.num_tensors,
    }


def logits_equal(state: dict, rank: int, world_size: int) -> bool:
    """The refitted engine and the ground truth produce identical logits (checked on TP rank 0)."""
    import torch

    tokens = [[1, 5, 9, 2, 7, 3, 11, 4]]
    got = trainer_ops.logits(state, rank, world_size, key="engine", tokens=tokens)
    want = trainer_ops.logits(state, rank, world_size, key="truth", tokens=tokens)
    return got is None or bool(torch.equal(got, want))
