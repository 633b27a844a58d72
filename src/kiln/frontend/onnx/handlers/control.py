"""ONNX handlers: control."""

from __future__ import annotations

from kiln.frontend.onnx.handlers import onnx_op  # noqa: F401
