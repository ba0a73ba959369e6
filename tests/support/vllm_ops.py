"""Helpers of the vLLM tests: model cases vLLM's CPU backend runs, a trainer per catalog name, greedy probes.

vLLM's CPU attention needs head_dim >= 32 (and Qwen2 derives head_dim from hidden / heads), and vLLM
runs bf16 here, so the cases are bf16 with hidden / heads = 32. The llama case has a vocabulary of
1000: Megatron pads it to 1024 or 2048, vLLM to 1024, and at engine TP 2 the rank boundary (512) is
not at ceil(1000 / 2). The tied Qwen2 case has 4 KV heads (a Megatron trainer at TP 4 needs them)
and the same vocabulary of 1000: rank 1 of an engine at TP 2 holds rows [512, 1000) and 24 rows of
padding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tests.support import hf_models as hm

OPS = "tests.support.refit_ops"
BUILD = "tests.support.trainer_ops:build"
LOAD = "tests.support.trainer_ops:load"

LLAMA = dataclasses.replace(
    hm.LLAMA_GQA,
    id="vllm-llama",
    dtype="bfloat16",
    hf_config={**hm.LLAMA_GQA.hf_config, "num_attention_heads": 4, "vocab_size": 1000},
    make_vocab_size_divisible_by=128,
)
QWEN2 = dataclasses.replace(
    hm.QWEN2_BIAS,
    id="vllm-qwen2",
    dtype="bfloat16",
    hf_config={**hm.QWEN2_BIAS.hf_config, "hidden_size": 128, "intermediate_size": 256},
)
QWEN2_TIED = dataclasses.replace(
    QWEN2,
    id="vllm-qwen2-tied",
    hf_config={**QWEN2.hf_config, "num_key_value_heads": 4, "vocab_size": 1000, "tie_word_embeddings": True},
)
# DeepSeek-V3 as vLLM's CPU MLA backend runs it: its decode kernel takes only kv_lora_rank + qk_rope_head_dim
# = 576 (512 + 64; smaller dims fail with "Head dimension 32 is not supported by MLA"). vLLM creates the
# router's `e_score_correction_bias` only with topk_method="noaux_tc" and scores with softmax unless
# scoring_func="sigmoid" (HF's DeepseekV3 ignores both keys and always does both, as Megatron's config does):
# real DeepSeek-V3 configs carry them. A dense first layer, then two MoE layers (8 experts in 2 groups, one
# shared expert). bf16, vLLM's CPU dtype here; the router bias stays fp32 on every side.
DEEPSEEK_V3 = dataclasses.replace(
    hm.DEEPSEEK_V3,
    id="vllm-deepseek-v3",
    dtype="bfloat16",
    hf_config={
        **hm.DEEPSEEK_V3.hf_config,
        "num_hidden_layers": 3,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
    },
)
DEEPSEEK_V3_NO_QLORA = dataclasses.replace(
    DEEPSEEK_V3, id="vllm-deepseek-v3-no-qlora", hf_config={**DEEPSEEK_V3.hf_config, "q_lora_rank": None}
)
# vLLM's reference MLA backend, which runs on every CPU. On a host with AMX tiles vLLM picks its AMX
# backend instead, whose packed weights need head dimensions these tiny models do not have ("invalid
# weight input features 16") and whose post-load products are not the W_UK_T / W_UV the tests compare.
CPU_MLA = {"backend": "CPU_MLA"}
PROMPTS = [[1, 2, 3, 4, 5], [7, 100, 42, 9], [300, 11, 5, 5, 61, 2]]
_names = itertools.count()


def version_model(case: hm.ModelCase, version: int) -> torch.nn.Module:
    """Ground truth of `version`: version 1 is the seed-1 model, version k > 1 its perturbation with seed k."""
    model = hm.build_hf_model(case, seed=1)
    if version > 1:
        model.load_state_dict(hm.perturbed_state_dict(model.state_dict(), seed=version))
    return model


def save_checkpoint(case: hm.ModelCase, version: int, path: Path) -> Path:
    """An HF checkpoint directory vLLM can start from."""
    version_model(case, version).save_pretrained(str(path), safe_serialization=True)
    return path


class Trainer:
    """One Megatron model on the trainer cluster at a TP/PP layout, publishing under its own catalog name."""

    def __init__(
        self, cluster: Any, catalog: str, tmp: Path, case: hm.ModelCase, *, tp: int, pp: int = 1, **moe: int
    ) -> None:
        """`moe`: a MoE case's expert parallelism, `ep` and `etp` (see `trainer_ops.build`)."""
        self.cluster, self.catalog, self.tmp, self.case = cluster, catalog, tmp, case
        self.name = f"{case.id}-tp{tp}-pp{pp}-{next(_names)}"
        self.vocab = case.vocab_size if hm.padded_vocab(case, tp) != case.vocab_size else 0
        self._published = False
        path = self._state_file(1)
        cluster.run(BUILD, key=self.name, case=case.to_dict(), hf_path=str(path), tp=tp, pp=pp, **moe)

    def _state_file(self, version: int) -> Path:
        from safetensors.torch import save_file

        path = self.tmp / f"{self.name}-v{version}.safetensors"
        sd = version_model(self.case, version).state_dict()
        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
        return path

    def publish(self, version: int, *, ranks: list[int] | None = None) -> list[dict]:
        """Make the trainer hold `version`'s weights (invalidating first), then publish them."""
        if self._published:
            self.cluster.run(f"{OPS}:invalidate", name=self.name)
        if version > 1:
            self.cluster.run(LOAD, key=self.name, hf_path=str(self._state_file(version)))
        self._published = True
        return self.cluster.run(
            f"{OPS}:publish", key=self.name, catalog=self.catalog, version=version, vocab_size=self.vocab, ranks=ranks
        )

    def close(self) -> None:
        self.cluster.run(f"{OPS}:close_publisher", name=self.name)
        self.cluster.run("tests.support.trainer_ops:drop", key=self.name)


def engine_env(tp: int) -> dict[str, str]:
    """Environment vLLM's CPU engine needs here (2 cores)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    return env


def engine_kwargs(path: Path, tp: int) -> dict[str, Any]:
    return dict(
        model=str(path),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=128,
        enforce_eager=True,
        load_format="safetensors",
        tensor_parallel_size=tp,
        weight_transfer_config={"backend": "refit"},
    )


@contextlib.contextmanager
def running_engine(path: Path, tp: int, **extra: Any) -> Iterator[Any]:
    """A `vllm.LLM` with the refit backend on checkpoint `path` at engine TP `tp`, shut down afterwards.

    `extra`: more `LLM` arguments (`enable_expert_parallel=True`). `VLLM_ALLOW_INSECURE_SERIALIZATION`
    lets `collective_rpc` send this module's functions to the workers.
    """
    from vllm import LLM

    env = {**engine_env(tp), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        llm = LLM(**engine_kwargs(path, tp), **extra)
        try:
            yield llm
        finally:
            # vLLM's shutdown can race its own worker processes' exit (psutil.NoSuchProcess): they are gone either way.
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def greedy(llm: Any, prompts: list[list[int]] = PROMPTS, max_tokens: int = 8) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def storage(model: torch.nn.Module) -> dict[str, list[int]]:
    """Where every non-empty tensor of a vLLM worker's model lives: `{name: [data_ptr, numel]}`.

    Run in the workers with `llm.apply_model(storage)`. Parameters and buffers: what CUDA graphs
    capture and layerwise reload keeps. (Not covered: plain tensor attributes such as the attention
    layers' host-side `_k_scale_cpu`, which vLLM's reload re-creates, and on CPU the repacked linear
    weights, which live in `layer.cpu_linear`'s closure and are re-packed on every reload.)
    """
    out: dict[str, list[int]] = {}
    for prefix, module in model.named_modules():
        tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        for key, t in tensors.items():
            if t.numel() > 0:
                out[f"{prefix}.{key}"] = [t.data_ptr(), t.numel()]
    return out


def moved(before: list[dict[str, list[int]]], after: list[dict[str, list[int]]]) -> list[str]:
    """Tensors (`rank:name`) whose storage differs between two `llm.apply_model(storage)` snapshots."""
    return sorted(
        f"{rank}:{name}"
        for rank, (b, a) in enumerate(zip(before, after, strict=True))
        for name in set(b) | set(a)
        if b.get(name) != a.get(name)
    )


def install_constants(worker: Any, *, meta: str, validate: bool = True) -> dict[str, Any]:
    """In a vLLM worker (`llm.collective_rpc(install_constants, kwargs=...)`): install constants with one meta tensor.

    Every tensor of the rank is a constant (norms 0.5, the rest 0.0) except `meta`, which has no data.
    With `validate=False` the adapter's checks are skipped, so the load itself fails part-way (at the
    layer holding `meta`). Returns the error and, per layer kind, whether it kept its old values.
    """
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    from refit.engines.vllm import VLLMEngine

    runner = worker.model_runner
    model = runner.model
    engine = VLLMEngine(
        model=model,
        model_config=runner.model_config,
        tp_rank=get_tensor_model_parallel_rank(),
        tp_size=get_tensor_model_parallel_world_size(),
        device=torch.device("cpu"),
    )
    if not validate:
        engine._validate = lambda tensors: None  # reach the load itself: fault injection
    tensors = {
        name: torch.empty(spec.shape, dtype=torch.bfloat16, device="meta")
        if name == meta
        else torch.full(spec.shape, 0.5 if "norm" in name else 0.0, dtype=torch.bfloat16)
        for name, spec in engine.expected().items()
    }
    params = dict(model.named_parameters())
    watched = ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
               "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
               "model.norm.weight")  # fmt: skip
    before = {n: params[n].detach().clone() for n in watched}
    layout = storage(model)
    error = ""
    try:
        engine.install(tensors)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which names the class it expects
        error = f"{type(exc).__name__}: {exc}"
    params = dict(model.named_parameters())
    return {
        "error": error,
        "moved": moved([layout], [storage(model)]),
        "unchanged": {n: bool(torch.equal(before[n], params[n])) for n in watched},
    }


def digest(model: torch.nn.Module) -> dict[str, str]:
    """The bytes of every non-empty parameter and buffer of a vLLM worker's model: `{name: sha256}`.

    Run in the workers with `llm.apply_model(digest)`. Covers what vLLM keeps in parameters after its
    post-load processing: on CPU the fused experts in their prepacked layout, routers, norms, embedding
    tables (linear layers keep their packed weights outside parameters: `probe` covers those).
    """
    import hashlib

    out: dict[str, str] = {}
    for prefix, module in model.named_modules():
        tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        for key, t in tensors.items():
            if t.numel() > 0:
                raw = t.detach().contiguous().view(-1).view(torch.uint8)
                out[f"{prefix}.{key}"] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return out


def load_checkpoint(worker: Any, path: str) -> int:
    """In a vLLM worker: load an HF safetensors file through vLLM's own loader (layerwise reload, `load_weights`).

    vLLM gets whole HF tensors and cuts its rank's slices itself: the ground truth a refit must equal.
    MoE layers get their kernel dropped first: vLLM 0.32 otherwise takes a reload for a weight update and
    skips the CPU experts' padding and prepacking (wrong experts at TP 1, a shape error at TP 2), while
    without a kernel the layer is processed as at start-up (the tests check that against a fresh engine).
    Returns the number of parameters vLLM reports loaded.
    """
    from safetensors.torch import load_file
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    model = worker.model_runner.model
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.quant_method.moe_kernel = None
    weights = load_file(path)
    initialize_layerwise_reload(model)
    loaded = model.load_weights(sorted(weights.items()))
    finalize_layerwise_reload(model, worker.model_runner.model_config)
    return len(loaded)


def probe_each(llm: Any, prompts: list[list[int]] = PROMPTS, max_tokens: int = 8) -> list[list[tuple[int, list]]]:
    """`probe`, one prompt at a time. vLLM's CPU MLA models are not reproducible in a batch: the same
    engine gives other logprobs (and at times other tokens) for the same batch of prompts from one
    call to the next, while one prompt at a time repeats exactly."""
    return [probe(llm, [p], max_tokens)[0] for p in prompts]


def probe(llm: Any, prompts: list[list[int]] = PROMPTS, max_tokens: int = 8) -> list[list[tuple[int, list]]]:
    """Greedy tokens with the top-5 logprobs of every step: equal only for bit-identical forward passes."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, logprobs=5)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [
        [
            (tok, sorted((k, v.logprob) for k, v in step.items()))
            for tok, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)
        ]
        for o in outs
    ]
