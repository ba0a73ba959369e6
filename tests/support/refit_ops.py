"""Trainer-side refit steps run on every rank of a `TrainerCluster` (see cluster.py).

Each function has the cluster's signature `fn(state, rank, world_size, **kwargs)` and returns a
small picklable value. Publishers live in `state["publishers"]` between commands, so the memory a
version points at stays registered while the test's receiver pulls it.
"""

from __future__ import annotations

from typing import Any


def _publishers(state: dict) -> dict[str, Any]:
    return state.setdefault("publishers", {})


def publish(
    state: dict,
    rank: int,
    world_size: int,
    *,
    key: str,
    catalog: str,
    version: int,
    name: str | None = None,
    snapshots: int = 0,
    vocab_size: int = 0,
    ranks: list[int] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Publish `version` of model `key` (only on `ranks`, when given); `options` go to a new Publisher
    (`lease_s`, `heartbeat_s`, `takeover`)."""
    from refit import Publisher

    name = name or key
    pubs = _publishers(state)
    if name not in pubs:
        pubs[name] = Publisher(
            catalog=catalog, model=state[key], name=name, snapshots=snapshots, vocab_size=vocab_size, **options
        )
    pub = pubs[name]
    if ranks is not None and rank not in ranks:
        return {"rank": rank, "skipped": True}
    info = pub.stream_weights(version)
    return {"rank": rank, "state": info.state.value, "registrations": pub.num_registrations}


def invalidate(state: dict, rank: int, world_size: int, *, name: str) -> list[int]:
    """What a trainer does before an optimizer step in zero-copy mode."""
    return _publishers(state)[name].invalidate()


def retire_word(state: dict, rank: int, world_size: int, *, name: str, ranks: list[int]) -> bool:
    """Set this rank's live version word to RETIRED without telling the catalog (on `ranks` only):
    what a receiver sees of a step whose retirement has not reached the catalog yet."""
    if rank in ranks:
        _publishers(state)[name]._words.retire(0)  # reached into on purpose: no public way skips the catalog
    return rank in ranks


def close_publisher(state: dict, rank: int, world_size: int, *, name: str) -> bool:
    pub = _publishers(state).pop(name, None)
    if pub is not None:
        pub.close()
    return pub is not None


def second_publisher(state: dict, rank: int, world_size: int, *, key: str, catalog: str, name: str) -> str:
    """Try to claim this rank again with a new publisher; returns the error class name (or 'ok')."""
    from refit import Publisher
    from refit.errors import RefitError

    try:
        Publisher(catalog=catalog, model=state[key], name=name).close()
    except RefitError as exc:
        return type(exc).__name__
    return "ok"


def optimizer_step_retires(state: dict, rank: int, world_size: int, *, key: str, catalog: str, name: str) -> str:
    """A real torch optimizer step on a publisher given the optimizer: the live version is retired first."""
    import torch

    from refit import Publisher
    from refit.catalog.client import CatalogClient

    chunks = state[key] if isinstance(state[key], list) else [state[key]]
    params = [p for c in chunks for p in c.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    with Publisher(catalog=catalog, model=state[key], name=name, optimizer=opt) as pub:
        pub.stream_weights(1)
        import torch.distributed as dist

        dist.barrier()  # every rank published: version 1 is READY
        with CatalogClient(catalog) as client:
            before = client.get_version(name=name, version=1).state.value
            dist.barrier()  # every rank has looked before any rank steps (a step retires it for all)
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            after = client.get_version(name=name, version=1).state.value
        dist.barrier()
    return f"{before}->{after}"


def corrupt(state: dict, rank: int, world_size: int, *, catalog: str, name: str, version: int, tensor: str,
            ranks: list[int]) -> str | None:  # fmt: skip
    """Flip one byte of `tensor`'s published bytes in this rank's registered (CPU) memory, in the middle
    of the shard, without publishing anything; returns the global name of the tensor changed."""
    import ctypes

    from refit.catalog.client import CatalogClient

    if rank not in ranks:
        return None
    with CatalogClient(catalog) as client:
        source = next(s for s in client.get_sources(name=name, version=version) if s.rank == rank)
    desc = next(t for t in source.tensors if t.name.endswith(tensor))
    region = next(r for r in source.regions if r.index == desc.region)
    assert region.device == "cpu"
    byte = ctypes.c_uint8.from_address(region.addr + desc.byte_offset + desc.nbytes // 2 + 1)
    byte.value ^= 0x10
    return desc.name
