"""Engine adapters: where pulled weights are installed."""

from refit.engines.base import Engine, EngineSpec, TensorSpec
from refit.engines.hf import HFEngine
from refit.engines.megatron import MegatronEngine

__all__ = ["Engine", "EngineSpec", "HFEngine", "MegatronEngine", "TensorSpec"]
