"""gemm tactics (GPU)."""

from kiln.kernels.gemm import cublas, fp8, int8, norm_gemm, triton_gemm  # noqa: F401  (registers its tactics)
