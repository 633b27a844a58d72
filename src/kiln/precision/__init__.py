"""kiln.precision"""
