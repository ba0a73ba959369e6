"""`MegatronEngine`: a Megatron-Core GPTModel as the engine, in its own tensor-parallel layout.

Megatron -> Megatron resharding without Hugging Face names on the way: the engine rank asks for
each parameter under its global Megatron name, split as Megatron-Core splits it at the engine's TP
(the `megatron` target scheme), so fused QKV arrives as the engine rank's own query-group blocks,
`linear_fc1` as its `[gate_r; up_r]`, and vocabulary tables as its rows of the engine's padded
vocabulary. Installs copy into the existing parameters, so the model (and anything holding its
parameters, such as Megatron's inference engine and its CUDA graphs) keeps its storage.

megatron-core is imported only when an engine is created.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from refit.dtypes import dtype_name
from refit.engines.base import EngineSpec, TensorSpec, check_install
from refit.errors import ConfigError
from refit.megatron.model import LocalParam, local_parameters, model_chunks, parallel_coords

logger = logging.getLogger(__name__)


class MegatronEngine:
    """One engine rank holding a Megatron-Core GPTModel (TP any, PP 1).

    Args:
        model: the GPTModel (or a one-element list of it), built under this rank's parallel state.
        architecture: the HF family the catalog names ("llama", "qwen2", ...); default: not checked.
        vocab_size: the true vocabulary; default: whatever the catalog declares.
    """

    def __init__(
        self, model: nn.Module | Sequence[nn.Module], *, architecture: str | None = None, vocab_size: int = 0
    ) -> None:
        chunks = model_chunks(model)
        _, _, coords = parallel_coords()
        if len(chunks) != 1 or coords.pp_size != 1:
            raise ConfigError("MegatronEngine needs pipeline parallel size 1 and one model chunk")
        if vocab_size < 0:
            raise ConfigError(f"vocab_size must be >= 0, got {vocab_size}")
        self.model = chunks[0]
        self._coords = coords
        self._params: dict[str, LocalParam] = {p.name: p for p in local_parameters(chunks, coords)}
        cfg = self.model.config
        heads = cfg.num_attention_heads
        self._spec = EngineSpec(
            architecture=architecture or "",
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=heads,
            num_query_groups=cfg.num_query_groups or heads,
            kv_channels=cfg.kv_channels or cfg.hidden_size // heads,
            ffn_hidden_size=cfg.ffn_hidden_size,
            vocab_size=vocab_size,
            tied_embeddings=bool(self.model.share_embeddings_and_output_weights),
            tp_rank=coords.tp_rank,
            tp_size=coords.tp_size,
            scheme="megatron",
            padded_vocab_size=int(self.model.vocab_size),
        )

    def spec(self) -> EngineSpec:
        return self._spec

    def expected(self) -> dict[str, TensorSpec]:
        return {
            name: TensorSpec(shape=tuple(p.param.shape), dtype=dtype_name(p.param.dtype))
            for name, p in self._params.items()
        }

    @property
    def device(self) -> torch.device:
        return next(iter(self._params.values())).param.device

    def install(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy every tensor into its parameter; all are checked before the first byte is written."""
        check_install(self.expected(), tensors)
        with torch.no_grad():
            for name, t in tensors.items():
                self._params[name].param.copy_(t, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
