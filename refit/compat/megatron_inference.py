"""The megatron-core inference internals refit relies on to refit a running dynamic engine.

Read from megatron-core 0.19.2's source (`megatron/core/inference/apis/_llm_base.py`,
`engines/dynamic_engine.py`, `contexts/dynamic_context.py`, `config.py`, `inference_client.py`);
**not run yet** (the dynamic engine needs CUDA and FlashAttention, see docs/megatron.md). Every
function raises `DependencyError` naming the installed version when what it reads is missing.

The facade (`MegatronLLM` / `MegatronAsyncLLM`, coordinator mode) exposes the engine, its context and
its controller, and pause / unpause / suspend / resume; it has no call for a generation epoch, which
only `InferenceClient.set_generation_epoch` sends. The primary rank's client lives in the private
`_coord_runtime`, and its ZMQ socket belongs to the facade's event loop thread (`_loop_manager`):
the epoch is sent from a coroutine on that loop, as the facade sends PAUSE and RESUME.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from torch import nn

from refit.compat.megatron import require, version
from refit.errors import ConfigError

SOURCE_READ = ("0.19.2",)  # read from, not yet run against (GPU only)


@dataclass(frozen=True, kw_only=True, slots=True)
class KVSettings:
    """The dynamic context's settings that decide what a refit does to its caches."""

    kv_mode: str  # KVCacheManagementMode value: "persist" | "offload" | "recompute"
    prefix_caching: bool
    static_kv_memory_pointers: bool


def _get(obj: Any, name: str, where: str) -> Any:
    value = getattr(obj, name, None)
    require(value is not None, f"{where}.{name}")
    return value


def gpt_model(llm: Any) -> nn.Module:
    """The GPTModel the facade's engine runs (`llm.controller.inference_wrapped_model.model`)."""
    wrapper = _get(_get(llm, "controller", "MegatronLLM"), "inference_wrapped_model", "TextGenerationController")
    model = _get(wrapper, "model", "GPTInferenceWrapper")
    require(isinstance(model, nn.Module), "GPTInferenceWrapper.model (a torch module)")
    return model


def quantized_weights(model: nn.Module) -> str | None:
    """Why the engine computes from weights other than its parameters (None: it computes from them).

    FP8 inference converts the model (`prepare_model_for_fp8_inference`), and the inference-optimized
    layers with MXFP8 quantize the decoder weights into persistent buffers of their own, which CUDA
    graphs capture (megatron-core 0.19.2 `resharding/refit.py` converts them on every swap). A copy
    into the parameters would not reach those.
    """
    config = getattr(model, "config", None)
    if getattr(config, "fp8", None):
        return f"fp8={config.fp8!r}"
    if getattr(config, "transformer_impl", None) == "inference_optimized" and getattr(config, "fp8_recipe", None):
        return f"transformer_impl='inference_optimized' with fp8_recipe={config.fp8_recipe!r}"
    return None


def kv_settings(llm: Any) -> KVSettings:
    """The KV-cache settings of the facade's `DynamicInferenceContext` (`context.config`)."""
    config = _get(_get(llm, "context", "MegatronLLM"), "config", "DynamicInferenceContext")
    mode = _get(config, "kv_cache_management_mode", "InferenceConfig")
    return KVSettings(
        kv_mode=str(getattr(mode, "value", mode)),
        prefix_caching=bool(getattr(config, "enable_prefix_caching", False)),
        static_kv_memory_pointers=bool(getattr(config, "static_kv_memory_pointers", False)),
    )


def check_coordinator(llm: Any) -> None:
    """ConfigError unless the facade runs in coordinator mode (the only mode with pause / suspend)."""
    for name in ("pause", "unpause", "suspend", "resume", "is_primary_rank"):
        require(hasattr(llm, name), f"MegatronLLM.{name}")
    if getattr(llm, "_coord_runtime", None) is None:
        raise ConfigError(
            "the facade was built with use_coordinator=False: it has no pause/suspend, so it cannot be refitted "
            "while it runs (refit between generate() calls with refit.engines.MegatronEngine instead)"
        )


def is_primary(llm: Any) -> bool:
    return bool(llm.is_primary_rank)


def submit_generation_epoch(llm: Any, epoch: int) -> Any:
    """Send `set_generation_epoch(epoch)` from the facade's event loop (primary rank only).

    Returns the `concurrent.futures.Future` of the send; the engines stamp the epoch when their loop
    next drains its signals (in order with the PAUSE / RESUME sent before and after it).
    """
    runtime = _get(llm, "_coord_runtime", "MegatronLLM")
    client = _get(runtime, "client", "_CoordinatorRuntime")
    send = _get(client, "set_generation_epoch", "InferenceClient")
    loops = _get(llm, "_loop_manager", "MegatronLLM")

    async def stamp() -> None:
        send(int(epoch))

    return _get(loops, "submit", "_EventLoopManager")(stamp())


def installed() -> str:
    return version()


def require_coroutine(value: Any, what: str) -> None:
    """The async facade's lifecycle calls return coroutines; the sync facade's do not."""
    require(asyncio.iscoroutine(value), f"{what} (a coroutine on MegatronAsyncLLM)")


__all__ = [
    "SOURCE_READ",
    "KVSettings",
    "check_coordinator",
    "gpt_model",
    "installed",
    "is_primary",
    "kv_settings",
    "quantized_weights",
    "require_coroutine",
    "submit_generation_epoch",
]
