"""CPU tactics: alternatives to the reference that the tuner can choose from on CPU.

One module per op family; importing this package registers them all. Every tactic is exact about what it
takes (dtypes, ranks, attributes) and leaves the rest to the reference; corner cases only known at run time
(empty tensors, padding torch's kernels cannot express) fall back to the op table's reference inside the kernel.
"""

from kiln.kernels.cpu import activation, conv, gemm, norm, pool

__all__ = ["activation", "conv", "gemm", "norm", "pool"]
