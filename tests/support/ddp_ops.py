"""Trainer-rank operations for a GPTModel in Megatron DDP with the distributed optimizer (GPU only).

Run by `TrainerCluster(cuda=True).run`. Each rank builds a bf16 GPTModel (local spec) of a test case,
wraps it in megatron-core's `DistributedDataParallel` (distributed optimizer; `overlap_param_gather`
and `overlap_grad_reduce` on or off; small buckets, so there are several bucket groups), makes the
optimizer with `get_megatron_optimizer` and a refit `Publisher` hooked to it. `step` trains one
step on random tokens (different on each data-parallel rank), then publishes the version. On CPU
(gloo, the cluster's CPU shims) DDP works but the distributed optimizer does not: `shard_step`
writes each rank's own shards as its step would. `receiver` and `pulled` are the test process's side.

Ground truth, taken before `stream_weights`: the distributed optimizer writes each rank's own
shard of every bucket of the bf16 param buffer (`shard_buffer`: dp equal parts, part dp_rank); those
shards, gathered with plain `torch.distributed.all_gather` over the data-parallel group, are the
weights every rank must hold before the next forward. Compared to them bit for bit: the live buffer
before the publish (stale with `overlap_param_gather`: what publishing without the forced gather
would have exposed), the live buffer after it, and (in the test) what a receiver pulled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tests.support import hf_models as hm
from tests.support import trainer_ops

CASE = hm.LLAMA_BF16
SEQ = 32
BATCH = 2
BUCKET_ELEMENTS = 40_000  # several buckets (one with overlap_grad_reduce=False: Megatron makes it one)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def build(
    state: dict, rank: int, world_size: int, *, catalog: str, name: str, tp: int, overlap: bool, cuda: bool = True
) -> dict:
    """The DDP-wrapped model, its distributed optimizer and a Publisher hooked to it.

    `cuda=False` (a gloo cluster with the CPU shims): DDP and its param buffers, but no optimizer, since
    the distributed optimizer accepts only `torch.cuda.*Tensor` parameters; `shard_step` stands in for it.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from refit import Publisher

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = trainer_ops.transformer_config(CASE, tp=tp, pp=1, vpp=None, params_dtype=torch.bfloat16)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    torch.manual_seed(1234)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=hm.padded_vocab(CASE, tp),
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )
    if cuda:
        model = model.cuda()
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True,
        overlap_param_gather=overlap,
        overlap_grad_reduce=overlap,
        bucket_size=BUCKET_ELEMENTS,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    ddp.broadcast_params()
    optimizer = None
    if cuda:  # a large learning rate: every bf16 weight moves at every step, so a stale shard shows
        config = OptimizerConfig(optimizer="adam", lr=1e-2, bf16=True, use_distributed_optimizer=True, clip_grad=0.0)
        optimizer = get_megatron_optimizer(config, [ddp])
    publisher = Publisher(catalog=catalog, model=ddp, name=name, architecture=CASE.architecture, optimizer=optimizer)
    state.update(ddp=ddp, model=model, optimizer=optimizer, publisher=publisher, step=0)
    storages = {b.param_data.untyped_storage().data_ptr() for b in ddp.buffers}
    return {
        "buffers": len(ddp.buffers),
        "bucket_groups": len(ddp.bucket_groups),
        "registrations": publisher.num_registrations,
        "param_storages": len({p.untyped_storage().data_ptr() for p in model.parameters()} - storages),
        "dp_size": ps.get_data_parallel_world_size(),
    }


def _inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, positions and an explicit causal mask (Megatron's default mask is built on "cuda")."""
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=tokens.device), diagonal=1)[None, None]
    return tokens, positions, mask


def _train_step(state: dict, rank: int) -> float:
    from megatron.core import parallel_state as ps

    ddp, optimizer = state["ddp"], state["optimizer"]
    state["step"] += 1
    gen = torch.Generator().manual_seed(1000 * state["step"] + ps.get_data_parallel_rank())
    tokens = torch.randint(0, CASE.vocab_size, (BATCH, SEQ + 1), generator=gen).cuda()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = ddp(*_inputs(tokens[:, :-1]), labels=tokens[:, 1:]).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    ok, _, _ = optimizer.step()
    if not ok:
        raise RuntimeError("the optimizer step was skipped")
    return float(loss.detach())


def _gathered_truth(ddp: Any) -> list[list[torch.Tensor]]:
    """Per buffer, per bucket: this rank's and its peers' own shards, gathered with plain all_gather."""
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group(with_context_parallel=True)
    size, me = dist.get_world_size(group), dist.get_rank(group)
    truth = []
    for buffer in ddp.buffers:
        per_bucket = []
        for bucket in buffer.buckets:
            flat = bucket.param_data.view(-1)
            if flat.numel() % size:
                raise AssertionError(f"bucket of {flat.numel()} elements does not split over DP={size}")
            own = flat.chunk(size)[me].clone()
            parts = [torch.empty_like(own) for _ in range(size)]
            dist.all_gather(parts, own, group=group)
            per_bucket.append(torch.cat(parts))
        truth.append(per_bucket)
    return truth


def _stale_buckets(ddp: Any, truth: list[list[torch.Tensor]]) -> int:
    """Buckets whose live bytes differ from the truth."""
    return sum(
        not torch.equal(_bits(bucket.param_data.view(-1)), _bits(want))
        for buffer, wants in zip(ddp.buffers, truth, strict=True)
        for bucket, want in zip(buffer.buckets, wants, strict=True)
    )


def _params_of_truth(state: dict, truth: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each parameter's bytes cut from the gathered truth by where Megatron placed it in its bucket."""
    model, ddp = state["model"], state["ddp"]
    out = {}
    for name, param in model.named_parameters():
        for buffer, wants in zip(ddp.buffers, truth, strict=True):
            for bucket, want in zip(buffer.buckets, wants, strict=True):
                start = (param.data_ptr() - bucket.param_data.data_ptr()) // param.element_size()
                if 0 <= start < bucket.param_data.numel() and param in bucket.params:
                    out[name] = want[start : start + param.numel()].view(param.shape).cpu()
    missing = [n for n, _ in model.named_parameters() if n not in out]
    if missing:
        raise AssertionError(f"parameters outside the DDP buckets: {missing}")
    return out


def step(state: dict, rank: int, world_size: int, *, version: int) -> dict:
    """One training step, then `_publish`."""
    loss = _train_step(state, rank)
    return {"loss": loss, **_publish(state, rank, version)}


def shard_step(state: dict, rank: int, world_size: int, *, version: int) -> dict:
    """What a distributed-optimizer step does to the bf16 buffer, without one (CPU), then `_publish`.

    The version is retired first (the contract for weights changed without `optimizer=`); then each rank
    writes new values into its own shard of every bucket only, as `DistributedOptimizer.step()` copies
    its updated main params into the rank's shard and, with `overlap_param_gather`, gathers nothing.
    """
    from megatron.core import parallel_state as ps

    state["publisher"].invalidate()
    me, size = ps.get_data_parallel_rank(with_context_parallel=True), ps.get_data_parallel_world_size(True)
    gen = torch.Generator().manual_seed(1000 * version + me)
    with torch.no_grad():
        for buffer in state["ddp"].buffers:
            for bucket in buffer.buckets:
                own = bucket.param_data.view(-1).chunk(size)[me]
                own.copy_(torch.randn(own.shape, generator=gen).to(own.dtype))
    return _publish(state, rank, version)


def _publish(state: dict, rank: int, version: int) -> dict:
    """The truth, `stream_weights(version)`, and what the next forward's pre-hooks would gather."""
    ddp, publisher = state["ddp"], state["publisher"]
    truth = _gathered_truth(ddp)
    stale_before = _stale_buckets(ddp, truth)
    info = publisher.stream_weights(version)
    stale_after = _stale_buckets(ddp, truth)
    # What the next forward's pre-hooks (finish_param_sync) would do: gather again only where a
    # group is not dispatched, wait only where a handle is left.
    pending = [
        i for i, g in enumerate(ddp.bucket_groups) if not g.param_gather_dispatched or g.param_gather_handle is not None
    ]
    return {
        "state": info.state.value,
        "stale_before": stale_before,
        "stale_after": stale_after,
        "pending_gathers": pending if ddp.ddp_config.overlap_param_gather else [],
        "truth": _params_of_truth(state, truth) if rank == 0 else None,
    }


def forward_gathers(state: dict, rank: int, world_size: int) -> dict:
    """Run one forward (no step) and count the param all-gathers its pre-hooks start, and stale bytes after."""
    ddp = state["ddp"]
    started = []
    originals = {}
    for i, group in enumerate(ddp.bucket_groups):
        originals[i] = group.start_param_sync

        def counted(*args: Any, _i: int = i, **kwargs: Any) -> Any:
            started.append(_i)
            return originals[_i](*args, **kwargs)

        group.start_param_sync = counted
    before = [[b.param_data.clone() for b in buf.buckets] for buf in ddp.buffers]
    try:
        device = next(state["model"].parameters()).device
        with torch.no_grad():
            ddp(*_inputs(torch.zeros((BATCH, SEQ), dtype=torch.long, device=device)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for group in ddp.bucket_groups:
            del group.start_param_sync
    return {"started": started, "changed": _stale_buckets(ddp, before)}


def close(state: dict, rank: int, world_size: int) -> bool:
    publisher = state.pop("publisher", None)
    if publisher is not None:
        publisher.close()
    return True


# -- the test process's side: a receiver holding plain tensors ---------------------------------------


def receiver(catalog: str, name: str, version: int, device: torch.device) -> Any:
    """A TP1 Receiver whose engine holds the HF tensors the catalog's version describes."""
    from refit import Receiver
    from refit.catalog.client import CatalogClient
    from refit.engines.base import EngineSpec, TensorSpec
    from refit.plan import cost
    from refit.plan.planner import plan_refit
    from refit_bench.refit_run import BufferEngine  # the bench's engine of plain tensors

    with CatalogClient(catalog) as client:
        info = client.wait_ready(name=name, version=version, timeout_s=60)
        sources = client.get_sources(name=name, version=version)
    spec = EngineSpec.from_meta(info.model, tp_rank=0, tp_size=1)
    targets = plan_refit(model=info.model, sources=sources, layout=spec.layout()).targets
    shapes = {t.hf_name: TensorSpec(shape=t.shape, dtype=t.dtype) for t in targets}
    link = cost.GPU_LOCAL if device.type == "cuda" else cost.CPU_UCX
    return Receiver(catalog=catalog, engine=BufferEngine(spec, shapes, device), name=name, timeout_s=120,
                    link_cost=link)  # fmt: skip


def differing(rcv: Any, truth: dict[str, torch.Tensor]) -> list[str]:
    """Names whose pulled bytes (HF tensors, back in Megatron's layout by the test's converter) differ from `truth`."""
    from tests.support.megatron_convert import hf_to_megatron_local

    hf = {k: v.cpu() for k, v in rcv.engine.tensors.items()}
    got = hf_to_megatron_local(hf, CASE, tp_size=1, tp_rank=0, layers=range(CASE.num_layers), pre_process=True,
                               post_process=True, padded_vocab=hm.padded_vocab(CASE, 1))  # fmt: skip
    if sorted(got) != sorted(truth):
        return sorted(set(got) ^ set(truth))
    return [k for k in truth if not torch.equal(_bits(got[k].cpu()), _bits(truth[k]))]
