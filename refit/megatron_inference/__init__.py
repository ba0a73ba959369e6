"""refit for Megatron's dynamic inference engine (megatron-core 0.19): refit a running `MegatronLLM` /
`MegatronAsyncLLM` between pauses, and read the weight version of each generated token.

`MegatronRefitter` (driver.py) runs on every engine rank; `request_token_versions` (versions.py)
reads the versions Megatron stamped on a request. Importing this package imports neither
megatron-core nor torch.distributed; each name is loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "MegatronRefitter": "refit.megatron_inference.driver",
    "DynamicRefitReport": "refit.megatron_inference.driver",
    "CachePolicy": "refit.megatron_inference.versions",
    "cache_policy": "refit.megatron_inference.versions",
    "request_token_versions": "refit.megatron_inference.versions",
    "token_versions": "refit.megatron_inference.versions",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'refit.megatron_inference' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
