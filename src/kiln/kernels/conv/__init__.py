"""conv tactics (GPU)."""

from kiln.kernels.conv import cudnn, integer, patches, triton_conv, triton_depthwise, triton_stem  # noqa: F401
# (importing a module registers its tactics)
