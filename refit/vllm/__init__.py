"""refit for vLLM: the `refit` weight-transfer backend, one-call refits of `LLM`/`AsyncLLM`, fleet refit.

The one-call refits and the fleet run one state machine (`refit.vllm.flow`). Importing this package
does not import vLLM; each name is loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "VLLMEngine": "refit.engines.vllm",
    "RefitWeightTransferEngine": "refit.vllm.backend",
    "RefitReport": "refit.vllm.driver",
    "refit_llm": "refit.vllm.driver",
    "refit_async_llm": "refit.vllm.driver",
    "Fleet": "refit.vllm.fleet",
    "ServerResult": "refit.vllm.fleet",
    "register": "refit.vllm.plugin",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'refit.vllm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
