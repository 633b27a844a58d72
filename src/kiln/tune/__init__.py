"""kiln.tune"""
