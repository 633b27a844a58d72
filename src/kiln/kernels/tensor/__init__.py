"""Tensor-manipulation tactics: the in-place Concat (any device); on GPUs, shape inputs read once on the host and
gathers without host round trips (torch ops, or one Triton kernel)."""

from kiln.kernels.tensor import concat, gather, host_shapes, triton_gather  # noqa: F401  (registers its tactics)
