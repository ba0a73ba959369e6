"""Trainer-rank operations for a GPTModel in Megatron DDP with the distributed optimizer.

Run by `TrainerCluster(cuda=...).run`. Each rank builds its bf16 GPTModel chunk(s) (local spec; one
chunk, or one per virtual pipeline stage), wraps each chunk in its own megatron-core
`DistributedDataParallel` as Megatron-LM's `get_model` does (one `DistributedDataParallelConfig`
for all chunks, bucketing only in the first chunk: `disable_bucketing=chunk > 0`), makes the
distributed optimizer over all chunks with `get_megatron_optimizer` and a refit `Publisher` hooked
to it. `step` trains one step (every chunk runs forward and backward on its own random input: a
pipeline's activations are not needed to move the weights), runs the real optimizer step, then
publishes the version. On CPU the cluster's optimizer shims (`cluster.apply_optimizer_cpu_shims`)
let the same optimizer run on gloo. The test process's side (the receiver, the checks) is ddp_check.py.

Ground truth, taken before `stream_weights`: the distributed optimizer writes each rank's own
shard of every bucket of the bf16 param buffers (`shard_buffer`: dp equal parts, part dp_rank);
those shards, gathered with plain `torch.distributed.all_gather` over the data-parallel group, are
the weights every rank must hold before the next forward. Compared to them bit for bit: the live
buffers before the publish (stale with `overlap_param_gather`: what publishing without the forced
gather would have exposed), the live buffers after it, and (in the test) what a receiver pulled,
converted back to each chunk's Megatron layout by the test's own HF -> Megatron converter
(`ddp_check.differing`).

Order (`order_probe=True`): every place the step or the publisher changes parameter bytes (each
distributed optimizer's copy of its main params into the bf16 shards, each bucket group's param
all-gather) first asks the real catalog for the state of the version last published, and records
it; the publisher must have retired it before any of those writes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from tests.support import hf_models as hm
from tests.support import layouts, trainer_ops

# Four layers, so PP2 x VPP2 has a layer per chunk; bf16 weights, fp32 norms (two param buffers).
CASE = dataclasses.replace(hm.LLAMA_BF16, id="llama-gqa-4l-bf16",
                           hf_config={**hm.LLAMA_BF16.hf_config, "num_hidden_layers": 4})  # fmt: skip
SEQ = 32
BATCH = 2
HF_SEED = 5  # the HF model every rank starts from (tests/support/hf_models.build_hf_model)
BUCKET_ELEMENTS = 40_000  # several buckets (one with overlap_grad_reduce=False: Megatron makes it one)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def build(
    state: dict,
    rank: int,
    world_size: int,
    *,
    catalog: str,
    name: str,
    tp: int,
    overlap: bool,
    pp: int = 1,
    vpp: int | None = None,
    cuda: bool = True,
    order_probe: bool = False,
) -> dict:
    """The DDP-wrapped chunk(s), the distributed optimizer over them and a Publisher hooked to it."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from refit import Publisher
    from tests.support.cluster import apply_optimizer_cpu_shims

    if "publisher" in state:
        raise RuntimeError("a DDP model is already built on this rank; close it first")
    layouts.ensure_model_parallel(tp, pp, vpp)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    else:
        apply_optimizer_cpu_shims()
    config = trainer_ops.transformer_config(CASE, tp=tp, pp=pp, vpp=vpp, params_dtype=torch.bfloat16)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    hf = hm.build_hf_model(CASE, seed=HF_SEED).state_dict()
    models = []
    for vp_stage in [None] if vpp is None else range(vpp):
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                          vp_stage=vp_stage, pp_rank=pp_rank)  # fmt: skip
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=hm.padded_vocab(CASE, tp),
            max_sequence_length=SEQ,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            position_embedding_type="rope",
            vp_stage=vp_stage,
        )
        _load_hf(chunk, hf, tp)
        models.append(chunk.cuda() if cuda else chunk)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True,
        overlap_param_gather=overlap,
        overlap_grad_reduce=overlap,
        bucket_size=BUCKET_ELEMENTS,
    )
    ddps = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
        for i, m in enumerate(models)
    ]
    for ddp in ddps:
        ddp.broadcast_params()
    # A large learning rate: every bf16 weight moves at every step, so a stale shard shows.
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, bf16=True, use_distributed_optimizer=True, clip_grad=0.0)
    optimizer = get_megatron_optimizer(opt_config, ddps, use_gloo_process_groups=False)
    publisher = Publisher(catalog=catalog, model=ddps if vpp is not None else ddps[0], name=name,
                          architecture=CASE.architecture, optimizer=optimizer)  # fmt: skip
    state.update(ddps=ddps, models=models, optimizer=optimizer, publisher=publisher, step=0, probe=None)
    if order_probe:
        state["probe"] = _OrderProbe(catalog, name, ddps, optimizer)
    storages = {b.param_data.untyped_storage().data_ptr() for d in ddps for b in d.buffers}
    return {
        "buffers": sum(len(d.buffers) for d in ddps),
        "bucket_groups": [len(d.bucket_groups) for d in ddps],
        "registrations": publisher.num_registrations,
        "param_storages": len({p.untyped_storage().data_ptr() for m in models for p in m.parameters()} - storages),
        "dp_size": ps.get_data_parallel_world_size(),
        "layers": [trainer_ops._global_layers(m) for m in models],
    }


def _load_hf(chunk: Any, hf: dict[str, torch.Tensor], tp: int) -> None:
    """Start from the HF model: its tensors through the test's own converter into this chunk (exact:
    a reshuffle, and the bf16 norms widened to the local spec's fp32)."""
    from megatron.core import parallel_state as ps

    from tests.support.megatron_convert import hf_to_megatron_local

    local = hf_to_megatron_local(hf, CASE, tp_size=tp, tp_rank=ps.get_tensor_model_parallel_rank(),
                                 layers=trainer_ops._global_layers(chunk), pre_process=chunk.pre_process,
                                 post_process=chunk.post_process, padded_vocab=hm.padded_vocab(CASE, tp))  # fmt: skip
    result = chunk.load_state_dict(local, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise AssertionError(f"state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}")


def publish_initial(state: dict, rank: int, world_size: int, *, version: int) -> dict:
    """Publish the weights as built (the HF model's, before any step); as `step` without the step."""
    return _publish(state, version)


class _OrderProbe:
    """Records the catalog state of the last published version at every write of parameter bytes."""

    def __init__(self, catalog: str, name: str, ddps: list[Any], optimizer: Any) -> None:
        from refit.catalog.client import CatalogClient
        from refit.compat import megatron as mcore

        self.client, self.name = CatalogClient(catalog), name
        self.version: int | None = None  # the version last published
        self.seen: list[tuple[str, str]] = []  # (which write, state of `version` just before it)
        for i, ddp in enumerate(ddps):
            for j, group in enumerate(ddp.bucket_groups):
                self._before(group, "start_param_sync", f"gather chunk{i} group{j}")
        # Each DistributedOptimizer of the chain (dense, fp32) copies its main params into its shards.
        for k, opt in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
            self._before(opt, "_copy_main_params_to_model_params", f"shard write optimizer{k}")
        self.torch_optimizers = mcore.torch_optimizers(optimizer)

    def _before(self, obj: Any, method: str, what: str) -> None:
        real = getattr(obj, method)

        def probed(*args: Any, **kwargs: Any) -> Any:
            if self.version is not None:
                self.seen.append((what, self.client.version_state(name=self.name, version=self.version).value))
            return real(*args, **kwargs)

        setattr(obj, method, probed)

    def take(self) -> list[tuple[str, str]]:
        seen, self.seen = self.seen, []
        return seen

    def close(self) -> None:
        self.client.close()


def _inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, positions and an explicit causal mask (Megatron's default mask is built on "cuda")."""
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=tokens.device), diagonal=1)[None, None]
    return tokens, positions, mask


def _forward(ddp: Any, model: Any, tokens: torch.Tensor, gen: torch.Generator, *, labels: bool) -> torch.Tensor:
    """One chunk's forward on its own: tokens into the first chunk, random hidden states into the others."""
    ids, positions, mask = _inputs(tokens[:, :-1])
    if not model.pre_process:
        hidden = torch.randn((SEQ, BATCH, CASE.hidden_size), generator=gen).to(torch.bfloat16).to(tokens.device)
        model.set_input_tensor(hidden.requires_grad_(labels))
        ids = None
    out = ddp(ids, positions, mask, labels=tokens[:, 1:] if labels and model.post_process else None)
    return out.float().mean() if model.post_process else out.float().square().mean()


def _train_step(state: dict) -> float:
    from megatron.core import parallel_state as ps

    ddps, models, optimizer = state["ddps"], state["models"], state["optimizer"]
    state["step"] += 1
    device = next(models[0].parameters()).device
    gen = torch.Generator().manual_seed(1000 * state["step"] + ps.get_data_parallel_rank())
    tokens = torch.randint(0, CASE.vocab_size, (BATCH, SEQ + 1), generator=gen).to(device)
    for ddp in ddps:
        ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = []
    for ddp, model in zip(ddps, models, strict=True):
        loss = _forward(ddp, model, tokens, gen, labels=True)
        loss.backward()
        losses.append(float(loss.detach()))
    for ddp in ddps:
        ddp.finish_grad_sync()
    ok, _, _ = optimizer.step()
    if not ok:
        raise RuntimeError("the optimizer step was skipped")
    return sum(losses)


def _gathered_truth(ddps: list[Any]) -> list[list[list[torch.Tensor]]]:
    """Per chunk, buffer and bucket: this rank's and its peers' own shards, gathered with plain all_gather."""
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group(with_context_parallel=True)
    size, me = dist.get_world_size(group), dist.get_rank(group)
    truth = []
    for ddp in ddps:
        per_buffer = []
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
            per_buffer.append(per_bucket)
        truth.append(per_buffer)
    return truth


def _buckets(ddps: list[Any]) -> list[Any]:
    return [bucket for ddp in ddps for buffer in ddp.buffers for bucket in buffer.buckets]


def _stale_buckets(ddps: list[Any], truth: list[list[list[torch.Tensor]]]) -> int:
    """Buckets whose live bytes differ from the truth."""
    wants = [want for per_buffer in truth for per_bucket in per_buffer for want in per_bucket]
    return sum(
        not torch.equal(bits(bucket.param_data.view(-1)), bits(want))
        for bucket, want in zip(_buckets(ddps), wants, strict=True)
    )


def _params_of_truth(model: Any, ddp: Any, truth: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each parameter's bytes of one chunk, cut from the gathered truth where Megatron placed it."""
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


def _chunk_truths(state: dict, truth: list[list[list[torch.Tensor]]]) -> list[dict] | None:
    """The truth of each chunk with what the converter needs to place it; only data-parallel rank 0 sends it."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0:
        return None
    return [
        {
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "tp_size": ps.get_tensor_model_parallel_world_size(),
            "layers": trainer_ops._global_layers(model),
            "pre_process": model.pre_process,
            "post_process": model.post_process,
            "params": _params_of_truth(model, ddp, chunk_truth),
        }
        for model, ddp, chunk_truth in zip(state["models"], state["ddps"], truth, strict=True)
    ]


def step(state: dict, rank: int, world_size: int, *, version: int) -> dict:
    """One training step with the real distributed optimizer, then `_publish`."""
    loss = _train_step(state)
    return {"loss": loss, **_publish(state, version)}


def _publish(state: dict, version: int) -> dict:
    """The truth, `stream_weights(version)`, and what the next forward's pre-hooks would gather."""
    ddps, publisher, probe = state["ddps"], state["publisher"], state["probe"]
    step_writes = probe.take() if probe is not None else []
    truth = _gathered_truth(ddps)
    stale_before = _stale_buckets(ddps, truth)
    info = publisher.stream_weights(version)
    publish_writes = probe.take() if probe is not None else []
    if probe is not None:
        probe.version = version
    stale_after = _stale_buckets(ddps, truth)
    # What the next forward's pre-hooks (finish_param_sync) would do: gather again only where a
    # group is not dispatched, wait only where a handle is left.
    pending = [
        (i, j)
        for i, ddp in enumerate(ddps)
        for j, g in enumerate(ddp.bucket_groups)
        if ddp.ddp_config.overlap_param_gather and (not g.param_gather_dispatched or g.param_gather_handle is not None)
    ]
    return {
        "state": info.state.value,
        "stale_before": stale_before,
        "stale_after": stale_after,
        "pending_gathers": pending,
        "step_writes": step_writes,
        "publish_writes": publish_writes,
        "truth": _chunk_truths(state, truth),
    }


def forward_gathers(state: dict, rank: int, world_size: int) -> dict:
    """Run one forward of every chunk (no step); the param all-gathers its pre-hooks start, and buckets changed."""
    ddps, models = state["ddps"], state["models"]
    started = []
    saved = [(g, g.__dict__.get("start_param_sync")) for d in ddps for g in d.bucket_groups]  # the probe's, if any
    for i, ddp in enumerate(ddps):
        for j, group in enumerate(ddp.bucket_groups):
            real = group.start_param_sync

            def counted(*args: Any, _at: tuple = (i, j), _real: Any = real, **kwargs: Any) -> Any:
                started.append(_at)
                return _real(*args, **kwargs)

            group.start_param_sync = counted
    before = [b.param_data.clone() for b in _buckets(ddps)]
    try:
        device = next(models[0].parameters()).device
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for ddp, model in zip(ddps, models, strict=True):
                _forward(ddp, model, torch.zeros((BATCH, SEQ + 1), dtype=torch.long, device=device), gen,
                         labels=False)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for group, own in saved:
            if own is None:
                del group.start_param_sync
            else:
                group.start_param_sync = own
    changed = sum(not torch.equal(bits(b.param_data), bits(x)) for b, x in zip(_buckets(ddps), before, strict=True))
    return {"started": started, "changed": changed}


def close(state: dict, rank: int, world_size: int) -> bool:
    publisher = state.pop("publisher", None)
    if publisher is not None:
        publisher.close()
    probe = state.pop("probe", None)
    if probe is not None:
        probe.close()
    for key in ("ddps", "models", "optimizer"):
        state.pop(key, None)
    return True
