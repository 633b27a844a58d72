"""kiln: an open inference compiler and runtime. ONNX in, a tuned engine out."""

from __future__ import annotations

__version__ = "0.1.0"
