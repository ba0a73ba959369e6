"""Reading Megatron-Core models: roles, global names, metadata and parallel coordinates (trainer and engine alike)."""
