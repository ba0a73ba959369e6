"""Helpers of the vLLM tests: model cases vLLM's CPU backend runs, a trainer per catalog name, greedy probes.

vLLM's CPU attention needs head_dim >= 32 (and Qwen2 derives head_dim from hidden / heads), and vLLM
runs bf16 here, so the cases are bf16 with hidden / heads = 32. The llama case has a vocabulary of
1000: Megatron pads it to 1024 or 2048, vLLM to 1024, and at engine TP 2 the rank boundary (512) is
not at ceil(1000 / 2).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
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

    def __init__(self, cluster: Any, catalog: str, tmp: Path, case: hm.ModelCase, *, tp: int, pp: int = 1) -> None:
        self.cluster, self.catalog, self.tmp, self.case = cluster, catalog, tmp, case
        self.name = f"{case.id}-tp{tp}-pp{pp}-{next(_names)}"
        self.vocab = case.vocab_size if hm.padded_vocab(case, tp) != case.vocab_size else 0
        self._published = False
        path = self._state_file(1)
        cluster.run(BUILD, key=self.name, case=case.to_dict(), hf_path=str(path), tp=tp, pp=pp)

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
