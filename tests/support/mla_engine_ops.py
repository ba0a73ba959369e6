"""Engine-side refit of a Megatron engine rank holding a DeepSeek-V3-architecture GPTModel (run by
`TrainerCluster.run`, after `engine_ops.build_pair`). Like `engine_ops.refit_and_compare`, but the
comparison with the ground truth covers the model's persistent buffers too: the routers'
`expert_bias`, which a refit must carry with the weights.
"""

from __future__ import annotations

from typing import Any


def _state(model: Any) -> dict[str, Any]:
    """Parameters and persistent buffers, without Megatron's `_extra_state` entries (not tensors)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


def refit_and_compare(
    state: dict, rank: int, world_size: int, *, catalog: str, name: str, version: int | None = None
) -> dict[str, Any]:
    """Refit the engine through refit; report bytes, kept storage and every state entry that differs."""
    import torch
    from megatron.core import parallel_state as ps

    from refit import Receiver
    from refit.engines import MegatronEngine

    engine = state["engine"][0] if isinstance(state["engine"], list) else state["engine"]
    truth = state["truth"][0] if isinstance(state["truth"], list) else state["truth"]
    ptrs = {n: t.data_ptr() for n, t in _state(engine).items()}
    with Receiver(
        catalog=catalog, engine=MegatronEngine(engine), name=name, replica=ps.get_data_parallel_rank()
    ) as rcv:
        result = rcv.update_weights(version)
    got, want = _state(engine), _state(truth)
    differ = sorted(set(got) ^ set(want)) + [n for n in got if n in want and not torch.equal(got[n], want[n])]
    return {
        "version": result.version,
        "bytes": result.bytes,
        "differ": differ,
        "biases": sum(n.endswith(".router.expert_bias") for n in got),
        "storage_kept": ptrs == {n: t.data_ptr() for n, t in _state(engine).items()},
        "state_bytes": sum(t.numel() * t.element_size() for t in got.values()),
    }
