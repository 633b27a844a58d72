"""onnxruntime's quantized operators in the QOperator format (com.microsoft): what `quantize_static(...,
quant_format=QuantFormat.QOperator)` writes around the standard QLinearConv / QLinearMatMul, and what the ONNX
Model Zoo's *-int8 models hold. Each is lowered to its meaning - DequantizeLinear of every quantized input, the
float op, QuantizeLinear of the result - the form of a QDQ model, which the precision passes place on int8
kernels as they do for QDQ exports.

- QLinearAdd / QLinearMul(A, A_scale, A_zp?, B, B_scale, B_zp?, C_scale, C_zp?)
- QLinearSigmoid / QLinearLeakyRelu(X, X_scale, X_zp?, Y_scale, Y_zp?; alpha)
- QLinearSoftmax(X, X_scale, X_zp?, Y_scale, Y_zp; axis, opset): opset >= 13 softmax over `axis`; before, over
  the flattened axes from `axis` on.
- QLinearAveragePool / QLinearGlobalAveragePool(X, x_scale, x_zp?, y_scale, y_zp?; the pool's attributes,
  channels_last: an NHWC input and output)
- QLinearConcat(Y_scale, Y_zp, (X, X_scale, X_zp)...; axis)
- QGemm(A, a_scale, a_zp, B, b_scale, b_zp, C?, y_scale?, y_zp?; alpha, transA, transB): C is int32 at scale
  a_scale * b_scale; b_scale per tensor or per output column; without y_scale the result stays float.

An absent zero point is 0 of the quantized input's type (the output's: the first input's).
"""

from __future__ import annotations

from typing import Any

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import onnx_op
from kiln.frontend.onnx.handlers.contrib import MS, _need, _one
from kiln.ir.dtype import DType
from kiln.ir.graph import Value


def _zero(n: NodeCtx, zp: Value | None, like: Value) -> Value:
    """The zero point, or 0 of `like`'s (quantized) type."""
    return zp if zp is not None else n.const(0, like.dtype, hint="zero_point")


def _dq(n: NodeCtx, at: int, what: str) -> Value:
    """DequantizeLinear of inputs at, at + 1 (scale), at + 2 (zero point)."""
    x = _need(n, at, what)
    return _one(n, "DequantizeLinear", [x, _need(n, at + 1, f"{what}'s scale"), _zero(n, n.input(at + 2), x)])


def _q(n: NodeCtx, y: Value, at: int, like: Value) -> Value:
    """QuantizeLinear of float `y` with inputs at (scale), at + 1 (zero point); `like` gives the type without one."""
    return _one(n, "QuantizeLinear", [y, _need(n, at, "the output's scale"), _zero(n, n.input(at + 1), like)])


def _binary(n: NodeCtx, op: str) -> list[Value]:
    y = _one(n, op, [_dq(n, 0, "A"), _dq(n, 3, "B")])
    return [_q(n, y, 6, _need(n, 0, "A"))]


@onnx_op("QLinearAdd", domain=MS)
def qlinear_add(n: NodeCtx) -> list[Value]:
    return _binary(n, "Add")


@onnx_op("QLinearMul", domain=MS)
def qlinear_mul(n: NodeCtx) -> list[Value]:
    return _binary(n, "Mul")


def _unary(n: NodeCtx, op: str, attrs: dict[str, Any] | None = None) -> list[Value]:
    return [_q(n, _one(n, op, [_dq(n, 0, "X")], attrs), 3, _need(n, 0, "X"))]


@onnx_op("QLinearSigmoid", domain=MS)
def qlinear_sigmoid(n: NodeCtx) -> list[Value]:
    return _unary(n, "Sigmoid")


@onnx_op("QLinearLeakyRelu", domain=MS)
def qlinear_leaky_relu(n: NodeCtx) -> list[Value]:
    return _unary(n, "LeakyRelu", {"alpha": float(n.attr("alpha", 0.01))})


@onnx_op("QLinearSoftmax", domain=MS)
def qlinear_softmax(n: NodeCtx) -> list[Value]:
    x = _need(n, 0, "X")
    axis, opset = int(n.attr("axis", -1)), int(n.attr("opset", 13))
    rank = x.rank
    if rank is None:
        raise n.fail("QLinearSoftmax needs an input of known rank")
    axis = axis % rank
    if opset >= 13 or axis == rank - 1:
        return _unary(n, "Softmax", {"axis": axis})
    # before opset 13: one softmax over all the axes from `axis` on
    flat = _one(n, "Flatten", [_dq(n, 0, "X")], {"axis": axis})
    y = _one(n, "Reshape", [_one(n, "Softmax", [flat], {"axis": 1}), _one(n, "Shape", [x])])
    return [_q(n, y, 3, x)]


def _pool(n: NodeCtx, op: str, attrs: dict[str, Any]) -> list[Value]:
    x = _need(n, 0, "X")
    y = _dq(n, 0, "X")
    last = bool(int(n.attr("channels_last", 0) or 0))
    rank = x.rank
    if last:
        if rank is None:
            raise n.fail("channels_last needs an input of known rank")
        y = _one(n, "Transpose", [y], {"perm": [0, rank - 1, *range(1, rank - 1)]})
    y = _one(n, op, [y], attrs)
    if last:
        assert rank is not None
        y = _one(n, "Transpose", [y], {"perm": [0, *range(2, rank), 1]})
    return [_q(n, y, 3, x)]


@onnx_op("QLinearAveragePool", domain=MS)
def qlinear_average_pool(n: NodeCtx) -> list[Value]:
    keys = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides", "dilations")
    return _pool(n, "AveragePool", {k: n.attrs[k] for k in keys if k in n.attrs})


@onnx_op("QLinearGlobalAveragePool", domain=MS)
def qlinear_global_average_pool(n: NodeCtx) -> list[Value]:
    return _pool(n, "GlobalAveragePool", {})


@onnx_op("QLinearConcat", domain=MS)
def qlinear_concat(n: NodeCtx) -> list[Value]:
    count = len(n.inputs) - 2
    if count <= 0 or count % 3:
        raise n.fail(f"QLinearConcat takes Y_scale, Y_zero_point and (X, X_scale, X_zero_point) triples, got "
                     f"{len(n.inputs)} inputs")
    parts = [_dq(n, at, f"input {at}") for at in range(2, len(n.inputs), 3)]
    y = _one(n, "Concat", parts, {"axis": int(n.attr("axis", 0))})
    return [_q(n, y, 0, _need(n, 2, "the first input"))]


@onnx_op("QGemm", domain=MS)
def qgemm(n: NodeCtx) -> list[Value]:
    a, b = _need(n, 0, "A"), _need(n, 3, "B")
    trans_b = int(n.attr("transB", 0))
    a_scale, b_scale = _need(n, 1, "a_scale"), _need(n, 4, "b_scale")
    per_column = b_scale.rank == 1 and b_scale.shape is not None and b_scale.shape[0] != 1
    b_attrs = {"axis": 0 if trans_b else 1} if per_column else {}
    fa = _one(n, "DequantizeLinear", [a, a_scale, _zero(n, n.input(2), a)])
    fb = _one(n, "DequantizeLinear", [b, b_scale, _zero(n, n.input(5), b)], b_attrs)
    c = n.input(6)
    fc = None
    if c is not None:  # int32 at scale a_scale * b_scale, zero point 0
        fc = _one(n, "Mul", [_one(n, "Cast", [c], {"to": DType.FLOAT32}), _one(n, "Mul", [a_scale, b_scale])])
    attrs = {"alpha": float(n.attr("alpha", 1.0)), "transA": int(n.attr("transA", 0)), "transB": trans_b}
    y = _one(n, "Gemm", [fa, fb, fc], attrs)
    if n.input(7) is None:
        return [y]
    return [_q(n, y, 7, a)]

