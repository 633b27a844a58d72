"""Tensor-manipulation tactics: the in-place Concat (any device); on GPUs, shape inputs read once on the host and
gathers without host round trips (torch ops, or one Triton kernel); embeddings (lookups summed and normalized) as
one kernel."""

from kiln.kernels.tensor import (  # noqa: F401  (registers its tactics)
    concat,
    embedding,
    gather,
    host_shapes,
    triton_gather,
)
