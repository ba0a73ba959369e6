"""`HFEngine`: a Hugging Face transformers causal LM, updated in place (storage is kept)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from refit.dtypes import dtype_name
from refit.engines.base import EngineSpec, TensorSpec, check_install, spec_from_hf_config
from refit.errors import ConfigError
from refit.plan.naming import architecture_from_hf

logger = logging.getLogger(__name__)


class HFEngine:
    """A single-rank (TP 1) engine around a transformers `*ForCausalLM` model.

    `install` copies into the existing parameters under `torch.no_grad()`, so references to the
    parameters (optimizers, CUDA graphs, other holders) stay valid. Every name, shape and dtype is
    checked before the first byte is written: a refused install leaves the old weights untouched.
    """

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_hidden_layers"):
            raise ConfigError(f"{type(model).__name__} is not a transformers causal LM (no config)")
        self.model = model
        self._config = config
        arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        self._architecture = architecture_from_hf(arch)
        self._params = dict(model.named_parameters())

    def spec(self) -> EngineSpec:
        return spec_from_hf_config(self._config, architecture=self._architecture)

    def expected(self) -> dict[str, TensorSpec]:
        tied = self.spec().tied_embeddings
        return {
            name: TensorSpec(shape=tuple(p.shape), dtype=dtype_name(p.dtype))
            for name, p in self._params.items()
            if not (tied and name == "lm_head.weight")
        }

    @property
    def device(self) -> torch.device:
        return next(iter(self._params.values())).device

    def install(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_install(self.expected(), tensors)
        with torch.no_grad():
            for name, t in tensors.items():
                self._params[name].copy_(t, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
