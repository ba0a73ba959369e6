"""The references `refit-bench refit` measures beside a refit, in the same run: the copy ceiling (and
with two GPUs or more the copy within the receiver's GPU and the link bound of what it read from each
trainer rank), a raw NIXL READ of the same bytes between two processes, and the classic refit (gather
on trainer rank 0, then broadcast to every receiver) of one replica's bytes.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.distributed as dist

from refit.dtypes import device_of
from refit_bench import measure
from refit_bench.procs import Worker, gather, join_group, rendezvous


def one_replica_bytes(sources: list[Any]) -> list[int]:
    """Bytes of one copy of the model per trainer rank (the classic design gathers one copy).

    Each distinct shard (a tensor's rows at one offset) is counted once, on the lowest rank that
    holds it: with DP that is the first replica; with EP, each expert's owner in the first expert-DP
    replica, which need not be a rank of the first dense replica.
    """
    seen: set[tuple[str, int, tuple[int, ...]]] = set()
    out = []
    for s in sorted(sources, key=lambda s: s.rank):
        mine = 0
        for d in s.tensors:
            key = (d.name, d.offset, d.local_shape)
            if key not in seen:
                seen.add(key)
                mine += d.nbytes
        if mine:  # ranks with nothing of their own (later replicas) take no part in the classic gather
            out.append(mine)
    return out


def references(
    args: argparse.Namespace, nbytes: int, shard_bytes: list[int], receivers: int, bar: Any, by_rank: dict[int, int]
) -> list:
    """The ceiling, a raw NIXL READ of the same bytes, and the classic baseline, in this run; with two GPUs
    or more and one receiver, also the link bound of the bytes it read from each trainer rank
    (`measure.link_bound_s`: trainer ranks on several GPUs pull over several links at once)."""
    from refit.transport.nixl import NixlAgent

    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    local = measure.torch_device(args.device, args.receiver_gpu)
    # With two GPUs the raw READ and the broadcast come from the other GPU, and the ceiling crosses too.
    peer_index = (args.receiver_gpu + 1) % gpus if gpus >= 2 else args.receiver_gpu
    peer = measure.torch_device(args.device, peer_index) if gpus >= 2 else None
    refs = [measure.copy_ceiling(nbytes, local, iters=args.iters, source=peer).as_dict()]
    if peer is not None:
        refs.append(measure.copy_ceiling(nbytes, local, iters=args.iters).as_dict())
        torch.cuda.set_device(local)
        if by_rank:
            seconds = measure.link_bound_s(by_rank, gpus=gpus, receiver_gpu=args.receiver_gpu,
                                           peer_gbps=refs[0]["gbps"], local_gbps=refs[1]["gbps"])  # fmt: skip
            what = "link bound (the copy rates above, all links at once)"
            refs.append(measure.Sample(what=what, nbytes=nbytes, seconds=(seconds,)).as_dict())
    world = 2 if gpus >= 2 and not args.no_baseline else 0
    store = rendezvous() if world else None
    source = Worker("refit_bench.measure:Source", device=args.device, device_index=peer_index, world=world,
                    port=store.port if store else 0, backend="nccl")  # fmt: skip
    agent = NixlAgent(prefix="bench-raw")
    try:
        if store is not None:
            join_group("nccl", rank=1, world_size=world, store=store)
        info = source.call(cmd="alloc", nbytes=nbytes)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=local)
        dst_device, dst_device_id = device_of(dst)
        agent.register(dst.data_ptr(), nbytes, device=dst_device, device_id=dst_device_id)
        refs.append(measure.nixl_read(agent, dst, info, nbytes, iters=args.iters).as_dict())
        if world:  # the peer baseline on two GPUs: NCCL broadcast of the same bytes, GPU to GPU
            source.send(cmd="bcast", nbytes=nbytes, iters=args.iters)
            refs.append(measure.broadcast(dst, nbytes, iters=args.iters, backend="nccl").as_dict())
            source.recv()
        del dst
    finally:
        agent.close()
        source.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    bar.update()
    world = len(shard_bytes) + receivers
    if not args.no_baseline and (args.device == "cpu" or gpus >= world):
        store = rendezvous()  # held until the ranks are gone
        ranks = [
            Worker("refit_bench.refit_ranks:ClassicRank", rank=r, world=world, port=store.port,
                   trainers=len(shard_bytes), shard_bytes=shard_bytes, device=args.device)
            for r in range(world)
        ]  # fmt: skip
        try:
            times = gather(ranks, cmd="run", iters=args.iters)[-1]["seconds"]
        finally:
            for w in ranks:
                w.close()
        sample = measure.Sample(what="classic: gather on rank 0 + broadcast", nbytes=nbytes, seconds=tuple(times))
        refs.append(sample.as_dict())
    bar.update()
    return refs
