"""`HFEngine`: a Hugging Face transformers causal LM, updated in place (storage is kept)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from refit.engines.base import EngineSpec, TensorSpec, install_tensors, spec_from_hf_config, specs_of
from refit.errors import ConfigError
from refit.plan.naming import architecture_from_hf

logger = logging.getLogger(__name__)


class HFEngine:
    """A single-rank (TP 1) engine around a transformers `*ForCausalLM` model.

    `install` copies into the existing parameters under `torch.no_grad()`, so references to the
    parameters (optimizers, CUDA graphs, other holders) stay valid. It is all-or-nothing: every name,
    shape, dtype and source tensor is checked before the first byte is written (`install_tensors`),
    so a refused install leaves the old weights untouched.

    Tied embeddings: `named_parameters()` lists a shared parameter once, under its first name
    (`model.embed_tokens.weight`), so the engine expects no `lm_head.weight` exactly when the output
    layer really is the embedding table. A model whose config says tied but whose `lm_head` was untied
    expects it, and the catalog's tied model then fails the check naming it, instead of leaving the
    untied output layer on its old weights.
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
        return specs_of(self._params)

    @property
    def device(self) -> torch.device:
        return next(iter(self._params.values())).device

    def install(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy every tensor into its parameter, in the order of `tensors`: all of them, or none."""
        install_tensors(self._params, tensors)
