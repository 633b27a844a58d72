"""conv tactics (GPU)."""

from kiln.kernels.conv import cudnn, integer, patches, triton_conv, triton_depthwise  # noqa: F401  (registers its tactics)
