"""Engine adapters: where pulled weights are installed."""

from refit.engines.base import Engine, EngineSpec, TensorSpec
from refit.engines.hf import HFEngine

__all__ = ["Engine", "EngineSpec", "HFEngine", "TensorSpec"]
