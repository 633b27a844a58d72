"""Tensor-manipulation tactics: the in-place Concat (any device); on GPUs, shape inputs read once on the host,
transposes that are views where the layout allows, and gathers and scatters without host round trips (torch ops,
or one Triton kernel); embeddings (lookups summed and normalized) as one kernel."""

from kiln.kernels.tensor import (  # noqa: F401  (registers its tactics)
    concat,
    embedding,
    gather,
    host_shapes,
    scatter,
    transpose,
    triton_gather,
)
