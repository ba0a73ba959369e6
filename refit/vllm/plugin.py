"""vLLM plugin entry point: registers the `refit` weight-transfer backend in every vLLM process.

Declared in pyproject.toml under `[project.entry-points."vllm.general_plugins"]`; vLLM calls
`register()` in the front end, the engine core and every worker, so `weight_transfer_config=
{"backend": "refit"}` works without importing refit by hand. The backend module (and with it the
rest of refit) is imported only when vLLM creates the engine.
"""

from __future__ import annotations

import logging

from refit.compat import vllm as vllm_compat

logger = logging.getLogger(__name__)

BACKEND = "refit"


def register() -> None:
    """Register `refit` with vLLM's `WeightTransferEngineFactory` (idempotent)."""
    if vllm_compat.register_weight_transfer_engine(BACKEND, "refit.vllm.backend", "RefitWeightTransferEngine"):
        logger.debug("registered the %r weight-transfer backend", BACKEND)
