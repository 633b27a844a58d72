"""Tensor-manipulation tactics (GPU): shape inputs read once on the host, gathers without host round trips."""

from kiln.kernels.tensor import gather, host_shapes  # noqa: F401  (registers its tactics)
