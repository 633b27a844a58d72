"""ONNX handlers: quantization, signal processing and strings, where ONNX versions differ from kiln's op."""

from __future__ import annotations

from typing import Any

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import onnx_op
from kiln.frontend.onnx.tensors import dtype_from_onnx
from kiln.ir.dtype import DType
from kiln.ir.graph import Value


def _versioned_attrs(n: NodeCtx, table: dict[int, tuple[str, ...]]) -> None:
    """Reject attributes the node's op version does not define (kiln would otherwise read them with the
    newest version's meaning)."""
    allowed = table[max(v for v in table if v <= n.since)]
    for k in n.attrs:
        if k not in allowed:
            raise n.fail(f"attribute '{k}' is not part of {n.op_type}-{n.since} "
                         f"(it has: {', '.join(allowed) or 'none'})")


def _dtype_attr(n: NodeCtx, name: str) -> DType | None:
    """An ONNX data-type attribute where 0 (UNDEFINED) means absent."""
    v = n.attrs.get(name)
    return None if v is None or v == 0 else dtype_from_onnx(int(v), f"attribute '{name}'")


# --- quantization -------------------------------------------------------------------------------------

_Q_ATTRS = {
    10: (),
    13: ("axis",),
    19: ("axis", "saturate"),
    21: ("axis", "saturate", "block_size", "output_dtype"),
    23: ("axis", "saturate", "block_size", "output_dtype", "precision"),
}
_DQ_ATTRS = {
    10: (),
    13: ("axis",),
    21: ("axis", "block_size"),
    23: ("axis", "block_size", "output_dtype"),
}


def _common_quant_attrs(n: NodeCtx) -> dict[str, Any]:
    return {k: n.attrs[k] for k in ("axis", "block_size", "saturate") if k in n.attrs}


@onnx_op("QuantizeLinear", since=10)
def quantize_linear(n: NodeCtx) -> list[Value]:
    """10: per tensor; 13: axis; 19: saturate, float8; 21: blocks, output_dtype, 4-bit; 23: precision, float4;
    24: float8e8m0 scales; 25: 2-bit; 28: float6. Later versions only widen what earlier ones mean."""
    _versioned_attrs(n, _Q_ATTRS)
    attrs = _common_quant_attrs(n)
    attrs["output_dtype"] = _dtype_attr(n, "output_dtype")
    attrs["precision"] = _dtype_attr(n, "precision")
    return n.emit("QuantizeLinear", n.inputs, attrs)


@onnx_op("DequantizeLinear", since=10)
def dequantize_linear(n: NodeCtx) -> list[Value]:
    """10: per tensor; 13: axis; 19: float8; 21: blocks, 4-bit; 23: output_dtype, float4; 24: float8e8m0
    scales; 25: 2-bit; 28: float6."""
    _versioned_attrs(n, _DQ_ATTRS)
    attrs = _common_quant_attrs(n)
    attrs["output_dtype"] = _dtype_attr(n, "output_dtype")
    return n.emit("DequantizeLinear", n.inputs, attrs)


# --- signal processing --------------------------------------------------------------------------------


@onnx_op("DFT", since=17)
def dft17(n: NodeCtx) -> list[Value]:
    """DFT-17 takes the axis as an attribute (default 1); DFT-20 as an input (default -2). Same meaning."""
    _versioned_attrs(n, {17: ("axis", "inverse", "onesided")})
    axis = n.const(int(n.attrs.get("axis", 1)), DType.INT64, hint="axis")
    attrs: dict[str, Any] = {k: n.attrs[k] for k in ("inverse", "onesided") if k in n.attrs}
    signal, length = n.input(0), n.input(1)
    return n.emit("DFT", [signal, length, axis], attrs)


@onnx_op("DFT", since=20)
def dft20(n: NodeCtx) -> list[Value]:
    return n.default()


# --- strings ------------------------------------------------------------------------------------------

_DEFAULT_CASE_LOCALES = ("", "C", "POSIX", "en", "en_US", "en_GB", "en_US.UTF-8", "en_US.utf8", "C.UTF-8")


@onnx_op("StringNormalizer", since=10)
def string_normalizer(n: NodeCtx) -> list[Value]:
    """kiln changes case by Unicode's default rules: locales with other rules (tr, az, lt) are refused."""
    locale = n.attrs.get("locale")
    if locale is not None and locale not in _DEFAULT_CASE_LOCALES and not str(locale).startswith("en"):
        known = ", ".join(repr(x) for x in _DEFAULT_CASE_LOCALES)
        raise n.fail(f"locale '{locale}' is not supported (kiln applies Unicode's default case rules)",
                     hint=f"supported: {known} and other en_* locales")
    return n.default()
