"""GPU kernels of our own (Triton, imported lazily: a CPU install never needs it)."""
