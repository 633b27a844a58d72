"""Pooling tactics (GPU)."""

from kiln.kernels.pool import torch_pool, triton_global_pool, triton_pool  # noqa: F401  (registers its tactics)
