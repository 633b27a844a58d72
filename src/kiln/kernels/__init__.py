"""kiln.kernels"""
