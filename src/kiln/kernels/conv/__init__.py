"""conv tactics (GPU)."""

from kiln.kernels.conv import cudnn  # noqa: F401  (registers its tactics)
