"""conv tactics (GPU)."""

from kiln.kernels.conv import cudnn, triton_conv  # noqa: F401  (registers its tactics)
