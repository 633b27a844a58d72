"""attention tactics (GPU)."""

from kiln.kernels.attention import sdpa  # noqa: F401  (registers its tactics)
