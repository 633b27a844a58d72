"""gemm tactics (GPU)."""

from kiln.kernels.gemm import cublas, triton_gemm  # noqa: F401  (registers its tactics)
