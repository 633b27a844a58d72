"""attention tactics (GPU)."""

from kiln.kernels.attention import sdpa, triton_flash, triton_rotary  # noqa: F401  (registers its tactics)
