"""gemm tactics (GPU)."""

from kiln.kernels.gemm import cublas  # noqa: F401  (registers its tactics)
