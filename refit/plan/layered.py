"""Chunks of whole layers, for engines that install a layer only once they hold all of it (vLLM).

vLLM's layerwise reload re-runs a layer's post-load processing when every tensor of that layer has
arrived, so a chunk that held half a layer could not be installed on its own. Here the staged pieces
are grouped by the engine layer of the targets their tensor feeds, the groups are kept in the
engine's order, and consecutive groups are packed into chunks of at most `limit` staging bytes.
A group larger than `limit` cannot be streamed: `ConfigError` names it before anything is pulled.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from refit.errors import ConfigError, LayoutError
from refit.plan.placement import Choice, Geometry, place
from refit.plan.records import Chunk
from refit.plan.targets import Target

Located = tuple[Choice, Geometry]
LayerKey = tuple[int, str]  # (the engine's order of the layer, its name)

# Staging slots of a layered plan: two, so a layer must fit half the window (a third would refuse
# windows that stream today; an engine's layer install, not the link, paces these chunks).
SLOTS = 2


def layer_chunks(
    located: Sequence[Located],
    enclosed: set[int],
    bridges: Callable[[int], bool],
    targets: Sequence[Target],
    layer_of: Callable[[Target], LayerKey],
    limit: int,
    window: int,
) -> tuple[Chunk, ...]:
    """`located` laid out as chunks of whole layers, each at most `limit` staging bytes.

    `layer_of` gives each target its layer; every target of one Megatron tensor must be in the same
    layer. Each chunk lists the targets it completes (`Chunk.targets`), padding-only targets (no
    pieces) included, and its layers (`Chunk.layers`). `window` is only named in the error.
    """
    layer_of_source: dict[str, LayerKey] = {}
    members: dict[LayerKey, list[str]] = defaultdict(list)
    for t in targets:
        key = layer_of(t)
        members[key].append(t.hf_name)
        known = layer_of_source.setdefault(t.source, key)
        if known != key:
            raise LayoutError(f"{t.source} feeds two engine layers, {known[1]} and {key[1]}: cannot stream it")
    pieces: dict[LayerKey, list[int]] = defaultdict(list)
    for i, (choice, _) in enumerate(located):
        pieces[layer_of_source[choice.need.tensor]].append(i)

    def laid(keys: list[LayerKey]) -> tuple[list, list, int]:
        idx = [i for k in keys for i in pieces.get(k, [])]
        return place([located[i] for i in idx], {n for n, i in enumerate(idx) if i in enclosed}, bridges)

    # 1. Every layer must fit a chunk on its own: refused here, before any byte is pulled.
    order = sorted(members)
    sizes = {key: laid([key])[2] for key in order}
    too_big = [key for key in order if sizes[key] > limit]
    if too_big:
        key = max(too_big, key=lambda k: sizes[k])
        raise ConfigError(
            f"layer {key[1]} needs {sizes[key]} staging bytes, over the {limit}-byte chunks a window of "
            f"max_staging_bytes={window} streams (a chunk is at most half the window, so one is pulled while "
            f"the other is installed); {len(too_big)} layer(s) do not fit: set max_staging_bytes >= "
            f"{2 * sizes[key]}"
        )
    # 2. Consecutive layers packed greedily (a layer's pieces are laid out again with its neighbours,
    #    so the packed size is measured, not summed).
    chunks: list[Chunk] = []
    run: list[LayerKey] = []
    layout: tuple[list, list, int] = ([], [], 0)
    for key in order:
        candidate = laid([*run, key])
        if run and candidate[2] > limit:
            chunks.append(_chunk(run, layout, members))
            run, candidate = [], laid([key])
        run.append(key)
        layout = candidate
    if run:
        chunks.append(_chunk(run, layout, members))
    return tuple(chunks)


def _chunk(keys: list[LayerKey], laid: tuple[list, list, int], members: dict[LayerKey, list[str]]) -> Chunk:
    pieces, reads, staging = laid
    return Chunk(
        pieces=tuple(pieces),
        reads=tuple(reads),
        staging_bytes=staging,
        targets=tuple(name for k in keys for name in members[k]),
        layers=tuple(k[1] for k in keys),
    )
