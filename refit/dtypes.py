"""Dtype and device names as refit's descriptors carry them, and their torch counterparts.

Descriptors name dtypes as torch does without the `torch.` prefix ("bfloat16"). torch is imported
only by the functions that need it, so the catalog server and the planner can use the sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refit.errors import ConfigError

if TYPE_CHECKING:
    import torch

# Element sizes of the dtypes a descriptor may carry.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`, the name descriptors carry."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16`; ConfigError for a dtype descriptors cannot carry."""
    if name not in DTYPE_SIZES:
        raise ConfigError(f"unsupported dtype {name!r}; supported: {sorted(DTYPE_SIZES)}")
    import torch

    return getattr(torch, name)


def device_of(tensor: torch.Tensor) -> tuple[str, int]:
    """("cuda", index) or ("cpu", 0): where a tensor's bytes live, as regions and NIXL name it."""
    return ("cuda", tensor.device.index or 0) if tensor.is_cuda else ("cpu", 0)
