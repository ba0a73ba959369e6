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

from refit.engines.base import EngineSpec, TensorSpec, install_tensors, specs_of
from refit.errors import ConfigError
from refit.megatron.model import local_parameters, model_chunks, model_meta, parallel_coords
from refit.plan.targets import Scheme

logger = logging.getLogger(__name__)


class MegatronEngine:
    """One engine rank holding a Megatron-Core GPTModel (TP, EP and expert TP any; PP 1).

    `install` is all-or-nothing: every name, shape, dtype and source tensor is checked before the
    first byte is written (`install_tensors`), so a refused install leaves the old weights untouched.

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
        self.model = chunks[0]
        # The reader's metadata is what a trainer of this model would publish: the engine is that
        # model at its own TP, EP and expert TP (its padded vocabulary included), so it asks for
        # exactly the experts its EP rank holds, split as its expert-TP rank holds them.
        meta = model_meta(chunks, architecture=architecture, vocab_size=vocab_size)
        self._spec = EngineSpec.from_meta(
            meta, architecture=architecture or "", tp_rank=coords.tp_rank, tp_size=coords.tp_size,
            ep_rank=coords.ep_rank, ep_size=coords.ep_size, expert_tp_rank=coords.etp_rank,
            expert_tp_size=coords.etp_size, scheme=Scheme.MEGATRON,
        )  # fmt: skip
        self._params = {p.name: p.param for p in local_parameters(chunks, coords)}

    def spec(self) -> EngineSpec:
        return self._spec

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
