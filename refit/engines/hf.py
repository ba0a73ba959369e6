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

    MoE models (transformers 5.x): routed experts live in two fused 3-D parameters per layer,
    `mlp.experts.gate_up_proj` `[E, 2F, H]` (gate rows first, then up) and `mlp.experts.down_proj`
    `[E, H, F]`. The engine expects them under the per-expert checkpoint names the planner targets
    (`mlp.experts.{e}.gate_proj.weight` -> `gate_up_proj[e, :F]`, `up_proj` -> `gate_up_proj[e, F:]`,
    `down_proj` -> `down_proj[e]`) and installs into those views, so the fused storage is kept.

    Persistent buffers are installed like parameters: DeepSeek-V3's router bias
    `mlp.gate.e_score_correction_bias` (fp32) changes with training and is published with the weights.
    """

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_hidden_layers"):
            raise ConfigError(f"{type(model).__name__} is not a transformers causal LM (no config)")
        self.model = model
        self._config = config
        arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        self._architecture = architecture_from_hf(arch)
        self._params = _install_views(model)

    def spec(self) -> EngineSpec:
        return spec_from_hf_config(self._config, architecture=self._architecture)

    def expected(self) -> dict[str, TensorSpec]:
        return specs_of(self._params)

    @property
    def device(self) -> torch.device:
        return next(iter(self._params.values())).device

    def destinations(self) -> dict[str, torch.Tensor]:
        """The live tensors `install` writes, by name: a receiver streams and reads straight into them."""
        return dict(self._params)

    def install(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy every tensor into its parameter (one batched copy): all of them, or none."""
        install_tensors(self._params, tensors)


# transformers' fused expert parameters, and the per-expert names each expert's slices go by.
_GATE_UP, _DOWN = ".experts.gate_up_proj", ".experts.down_proj"


def _install_views(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> the tensor `install` writes: each parameter and persistent buffer, with fused experts cut
    into per-expert views."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    # Persistent buffers are model state a trainer updates too (DeepSeek-V3's router bias
    # `e_score_correction_bias`, moved by load balancing); non-persistent ones (rotary tables) are derived.
    persistent = set(model.state_dict(keep_vars=True))
    out.update((name, b) for name, b in model.named_buffers() if name in persistent)
    for name, p in model.named_parameters():
        if p.ndim != 3 or not name.endswith((_GATE_UP, _DOWN)):
            out[name] = p
            continue
        experts = modules[name.rsplit(".", 1)[0]]
        layout = {k: getattr(experts, k, None) for k in ("is_transposed", "is_concatenated", "has_gate", "has_bias")}
        # Only the layout whose slices are known: [E, out, in], gate then up concatenated, no biases.
        if layout != {"is_transposed": False, "is_concatenated": True, "has_gate": True, "has_bias": False}:
            raise ConfigError(f"{name}: fused experts laid out as {layout}; HFEngine knows [E, 2F, H] gate-up only")
        prefix = name[: -len("gate_up_proj" if name.endswith(_GATE_UP) else "down_proj")]
        for e in range(p.shape[0]):
            if name.endswith(_GATE_UP):
                f = p.shape[1] // 2
                out[f"{prefix}{e}.gate_proj.weight"] = p[e, :f]
                out[f"{prefix}{e}.up_proj.weight"] = p[e, f:]
            else:
                out[f"{prefix}{e}.down_proj.weight"] = p[e]
    return out
