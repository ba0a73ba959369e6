"""Engine-side steps of the GPU test of a refit of Megatron's dynamic inference engine
(tests/gpu/test_megatron_dynamic.py), run on a one-rank `TrainerCluster(cuda=True)` (GPU 0, NCCL).

The engine is megatron-core 0.19's `MegatronLLM` (sync) or `MegatronAsyncLLM` (async), in coordinator
mode, over a GPTModel (local layer spec, bf16, TP 1) loaded from an HF checkpoint through the test's
own converter. The ground truth of its parameters is the same converter applied to the checkpoint
of the version. Each function has the cluster's signature `fn(state, rank, world_size, **kwargs)`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import torch

from tests.support import hf_models as hm
from tests.support import trainer_ops
from tests.support.megatron_convert import hf_to_megatron_local

CASE = hm.LLAMA_DYNAMIC


class ToyTokenizer:
    """What megatron-core's engine, controller and coordinator call on a tokenizer, for token-id prompts.

    Module-level so it pickles into the coordinator process Megatron spawns. Text is space-separated ids.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.bos = None

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids: list[int], **_: Any) -> str:
        return " ".join(str(int(i)) for i in ids)


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` token ids drawn from a seeded generator (ids below the eod id)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, CASE.vocab_size - 1, (count, length), generator=gen).tolist()


def _model(hf_path: str, *, cuda_graphs: bool) -> torch.nn.Module:
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    # Megatron's inference RNG tracker: the one its local CUDA graphs accept ("RNG tracker does not support
    # cudagraphs!" otherwise).
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True, force_reset_rng=True)
    config = trainer_ops.transformer_config(CASE, tp=1, pp=1, vpp=None, params_dtype=torch.bfloat16)
    if cuda_graphs:
        # inference_cuda_graph_scope was settled to "none" by the first __post_init__: derive it again.
        config = dataclasses.replace(config, cuda_graph_impl="local", inference_cuda_graph_scope=None)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=hm.padded_vocab(CASE, 1),
        max_sequence_length=int(CASE.hf_config["max_position_embeddings"]),
        position_embedding_type="rope",
        rotary_base=int(CASE.rope_theta),
    )
    model = model.to(torch.bfloat16).cuda().eval()
    result = model.load_state_dict(_truth(hf_path), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise AssertionError(f"state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    return model


def _truth(hf_path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return hf_to_megatron_local(
        load_file(hf_path), CASE, tp_size=1, tp_rank=0, layers=list(range(CASE.num_layers)), pre_process=True,
        post_process=True, padded_vocab=hm.padded_vocab(CASE, 1),
    )  # fmt: skip


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


def start(
    state: dict, rank: int, world_size: int, *, hf_path: str, facade: str, kv_mode: str, cuda_graphs: bool,
    prefix_caching: bool,
) -> dict[str, Any]:  # fmt: skip
    """Build the model from `hf_path` and a facade over it (`facade` "sync" or "async"), in coordinator mode."""
    from megatron.core.inference.apis import MegatronAsyncLLM, MegatronLLM
    from megatron.core.inference.config import InferenceConfig, KVCacheManagementMode
    from megatron.core.transformer import attention

    _one_split_on_hopper(attention)
    model = _model(hf_path, cuda_graphs=cuda_graphs)
    config = InferenceConfig(
        buffer_size_gb=2, max_sequence_length=1024, max_requests=8, max_tokens=4096,
        kv_cache_management_mode=KVCacheManagementMode(kv_mode), enable_prefix_caching=prefix_caching,
        num_cuda_graphs=4 if cuda_graphs else None, materialize_only_last_token_logits=True,
    )  # fmt: skip
    cls = MegatronLLM if facade == "sync" else MegatronAsyncLLM
    # Loopback: Megatron binds its ZMQ sockets on socket.gethostname() otherwise, which a sandbox may not resolve.
    tokenizer = ToyTokenizer(CASE.vocab_size)
    state["llm"] = cls(model=model, tokenizer=tokenizer, inference_config=config, coordinator_host="127.0.0.1")
    state["facade"], state["model"] = facade, model
    state["ptrs"] = {k: v.data_ptr() for k, v in _params(model).items()}
    return {"fa4": bool(getattr(attention, "HAVE_FA4", False)), "params": len(state["ptrs"])}


def _one_split_on_hopper(attention: Any) -> None:
    """Make Megatron's FlashAttention-4 calls ask for one KV split on SM 9.x.

    megatron-core 0.19.2 passes `num_splits=0` (FA4's heuristic) unless `batch_invariant_mode`; the heuristic
    picks a split for CUDA-graph warm-up shapes (few queries, long KV) and flash-attn-4 4.0.0b36 then asserts
    "SplitKV not supported on SM 9.0". One split is what FA4 runs on Hopper anyway for every other shape.
    """
    if torch.cuda.get_device_capability()[0] != 9 or getattr(attention, "_refit_one_split", False):
        return
    inner = attention.flash_attn4_varlen_func

    def one_split(*args: Any, **kwargs: Any) -> Any:
        kwargs["num_splits"] = 1
        return inner(*args, **kwargs)

    attention.flash_attn4_varlen_func = one_split
    attention._refit_one_split = True


def attach(state: dict, rank: int, world_size: int, *, catalog: str, name: str) -> str:
    from refit.megatron_inference import MegatronRefitter

    keep = state["llm"].context.config.kv_cache_management_mode.value != "recompute"
    state["refitter"] = MegatronRefitter(
        state["llm"], catalog=catalog, name=name, max_staging_bytes=1 << 30, keep_stale_kv=keep
    )
    return state["refitter"].policy.kv_mode


def mark(state: dict, rank: int, world_size: int, *, version: int) -> int:
    state["refitter"].mark_version(version)
    return version


def _report(report: Any) -> dict[str, Any]:
    return dataclasses.asdict(report)  # the CachePolicy becomes a dict too


def refit(state: dict, rank: int, world_size: int, *, version: int) -> dict[str, Any]:
    """Refit the (idle) engine to `version`; report, and whether every parameter kept its storage."""
    refitter = state["refitter"]
    sync = state["facade"] == "sync"
    report = refitter.refit(version) if sync else asyncio.run(refitter.refit_async(version))
    return {**_report(report), "storage_kept": _storage_kept(state)}


def _storage_kept(state: dict) -> bool:
    return state["ptrs"] == {k: v.data_ptr() for k, v in _params(state["model"]).items()}


def differing(state: dict, rank: int, world_size: int, *, hf_path: str) -> list[str]:
    """The engine's parameters that differ from the checkpoint at `hf_path` converted by the test's converter."""
    got = _params(state["model"])
    want = _truth(hf_path)
    out = sorted(set(got) ^ set(want))
    return out + [k for k in got if k in want and not torch.equal(got[k].detach().cpu(), want[k])]


def _sampling(tokens: int) -> Any:
    from megatron.core.inference.sampling_params import SamplingParams

    # Greedy (top 1), never stopped early: every request generates exactly `tokens` tokens.
    return SamplingParams(top_k=1, num_tokens_to_generate=tokens, termination_id=-1)


def _outputs(requests: list[Any]) -> list[dict[str, Any]]:
    from refit.megatron_inference.versions import position_versions, prompt_length, request_token_versions

    out = []
    for r in requests:
        tokens = [int(t) for t in r.generated_tokens]
        length = prompt_length(r) + len(tokens)
        kv = position_versions(r.kv_cache_epoch, length, what="kv_cache_epoch") if r.kv_cache_epoch else None
        out.append({"tokens": tokens, "versions": request_token_versions(r), "kv_versions": kv})
    return out


def generate(state: dict, rank: int, world_size: int, *, prompts: list[list[int]], tokens: int) -> list[dict]:
    """Greedy tokens of one batch of `prompts`, with each token's weight version."""
    llm = state["llm"]
    if state["facade"] == "sync":
        return _outputs(llm.generate(prompts, _sampling(tokens)))
    return _outputs(asyncio.run(llm.generate(prompts, _sampling(tokens))))


def _progress(llm: Any) -> tuple[int, int]:
    """(requests the engine holds, fewest tokens any of them has generated), read from the engine loop's state."""
    for _ in range(100):
        try:
            entries = list(llm.engine.requests.values())
            counts = [sum(len(r.generated_tokens) for r in e.record.requests) for e in entries]
            return len(entries), min(counts, default=0)
        except RuntimeError:  # the engine thread changed the dict while it was read
            time.sleep(0.001)
    raise AssertionError("could not read the engine's requests")


def _wait_for_tokens(llm: Any, count: int, min_tokens: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held, fewest = _progress(llm)
        if held == count and fewest >= min_tokens:
            return fewest
        time.sleep(0.002)
    raise AssertionError(f"the engine did not generate {min_tokens} tokens for {count} requests in {timeout_s}s")


def crossing(
    state: dict, rank: int, world_size: int, *, prompts: list[list[int]], tokens: int, version: int,
    min_before: int, timeout_s: float = 120.0,
) -> dict[str, Any]:  # fmt: skip
    """Start generating `prompts`; once each has `min_before` tokens, refit to `version` while they run."""
    llm, refitter = state["llm"], state["refitter"]
    if state["facade"] == "sync":
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["requests"] = llm.generate(prompts, _sampling(tokens))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                box["error"] = exc

        thread = threading.Thread(target=run, name="generate", daemon=True)
        thread.start()
        seen = _wait_for_tokens(llm, len(prompts), min_before, timeout_s)
        report = refitter.refit(version)
        thread.join(timeout_s)
        if "error" in box or thread.is_alive():
            raise AssertionError(f"generate failed or hung across the refit: {box.get('error')!r}")
        requests = box["requests"]
    else:

        async def run_async() -> tuple[int, Any, Any]:
            task = asyncio.ensure_future(llm.generate(prompts, _sampling(tokens)))
            deadline = time.monotonic() + timeout_s
            while True:
                held, fewest = _progress(llm)
                if held == len(prompts) and fewest >= min_before:
                    break
                if time.monotonic() > deadline or task.done():
                    raise AssertionError(f"no {min_before} tokens for every request in {timeout_s}s")
                await asyncio.sleep(0.002)
            seen = _progress(llm)[1]
            report = await refitter.refit_async(version)
            return seen, report, await asyncio.wait_for(task, timeout_s)

        seen, report, requests = asyncio.run(run_async())
    return {
        "outputs": _outputs(requests),
        "seen_before_refit": seen,
        "report": _report(report),
        "storage_kept": _storage_kept(state),
    }


def shutdown(state: dict, rank: int, world_size: int) -> bool:
    llm = state.pop("llm", None)
    refitter = state.pop("refitter", None)
    if refitter is not None:
        refitter.close()
    if llm is None:
        return False
    if state["facade"] == "sync":
        llm.shutdown()
    else:
        asyncio.run(llm.shutdown())
    return True
