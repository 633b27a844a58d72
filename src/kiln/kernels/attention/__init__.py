"""attention tactics (GPU)."""

from kiln.kernels.attention import sdpa, triton_flash  # noqa: F401  (registers its tactics)
