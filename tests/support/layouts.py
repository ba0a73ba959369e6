"""Megatron parallel state per layout in the trainer cluster's workers: created once, restored when a
test switches back, freed when no stored model uses it.

Each gloo group holds a TCP loop thread and two worker threads, and a layout creates ~17 groups
per rank, so layouts kept forever made idle workers burn CPU (measured: 7 MoE layouts, ~360 threads
and ~10% of a core per idle rank). `drop` in trainer_ops calls `free_unused_layouts`.
"""

from __future__ import annotations

from typing import Any

# Megatron parallel state per layout (TP, PP, VPP, EP, ETP), kept while a stored model uses the layout.
LAYOUTS: dict[tuple[int, int, int | None, int, int], dict[str, Any]] = {}


def _parallel_state_snapshot() -> dict[str, Any]:
    """Megatron's parallel state: the private module globals that `initialize_model_parallel` sets."""
    import inspect

    from megatron.core import parallel_state as ps

    return {
        k: v
        for k, v in vars(ps).items()
        if k.startswith("_")
        and not k.startswith("__")
        and not (inspect.isroutine(v) or inspect.ismodule(v) or inspect.isclass(v))
    }


def _layout_key(tp: int, pp: int, vpp: int | None, ep: int = 1, etp: int | None = None) -> tuple:
    return (tp, pp, vpp, ep, tp if etp is None else etp)  # Megatron's ETP defaults to TP


def _current_layout() -> tuple | None:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
    )


def ensure_model_parallel(tp: int, pp: int, vpp: int | None, ep: int = 1, etp: int | None = None) -> None:
    """Make Megatron's parallel state the one of this layout.

    A layout's groups are created once and kept while a stored model uses the layout: switching
    back restores the saved state instead of creating a fresh set of gloo groups
    (`destroy_model_parallel` forgets groups without freeing them). `drop` frees the groups of
    layouts no stored model uses any more (see `free_unused_layouts`).
    """
    from megatron.core import parallel_state as ps

    key = _layout_key(tp, pp, vpp, ep, etp)
    current = _current_layout()
    if current == key:
        return
    if current is not None:
        ps.destroy_model_parallel()
    if key in LAYOUTS:
        for name, value in LAYOUTS[key].items():
            setattr(ps, name, value)
        return
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        create_gloo_process_groups=False,  # the default group is gloo already
    )
    LAYOUTS[key] = _parallel_state_snapshot()


def _process_groups(value: Any, found: dict[int, Any]) -> dict[int, Any]:
    """Every process group in `value` (also inside lists, tuples, sets and dicts), by id; never WORLD."""
    import torch.distributed as dist

    if isinstance(value, dist.ProcessGroup):
        if value is not dist.GroupMember.WORLD:
            found[id(value)] = value
    elif isinstance(value, dict):
        _process_groups(list(value.values()), found)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _process_groups(item, found)
    return found


def free_unused_layouts(state: dict) -> int:
    """Destroy the process groups of every saved layout that no model in `state` uses; how many were freed.

    Each gloo group holds a TCP loop thread and two worker threads, ~17 groups per layout and rank:
    kept forever, seven MoE layouts cost every idle rank ~10% of a core. `destroy_process_group`
    only unlists a group; its threads end with its last reference, so the snapshot, every Megatron
    global still holding it (`destroy_model_parallel` misses `_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP`)
    and Megatron's RoPE cache let go too. Measured: that is all; a dropped model holds no group in
    a reference cycle, so no `gc.collect()` (1.2 s per rank) is needed.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    used = {
        _layout_key(*meta["layout"])
        for k, meta in state.items()
        if k.endswith("/meta") and isinstance(meta, dict) and "layout" in meta
    }
    unused = [key for key in LAYOUTS if key not in used]
    if not unused:
        return 0
    if _current_layout() in unused:
        ps.destroy_model_parallel()
    kept: dict[int, Any] = {}
    for key in LAYOUTS:
        if key in used:
            _process_groups(list(LAYOUTS[key].values()), kept)
    doomed: dict[int, Any] = {}
    for key in unused:
        _process_groups(list(LAYOUTS.pop(key).values()), doomed)
    for gid in kept:
        doomed.pop(gid, None)
    for name, value in _parallel_state_snapshot().items():
        if _process_groups(value, {}).keys() & doomed.keys():
            setattr(ps, name, None)
    live = dist.distributed_c10d._world.pg_map
    for group in doomed.values():
        if group in live:
            dist.destroy_process_group(group)
    doomed.clear()
    _clear_rope_caches()
    return len(unused)


def _clear_rope_caches() -> None:
    """Empty Megatron's RoPE `forward` caches (`lru_cache`s on the class, keyed by the module).

    A cached entry keeps its RotaryEmbedding alive, and with it the CP group of the model's layout:
    without this, every dropped model that ran forward would keep one gloo group (and its threads).
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    for cls in (RotaryEmbedding, *RotaryEmbedding.__subclasses__()):
        clear = getattr(vars(cls).get("forward"), "cache_clear", None)
        if clear is not None:
            clear()
