"""ONNX handlers: elementwise math, comparisons, logic, activations and casts.

Only versions that differ from kiln's op (the newest ONNX semantics) need a handler here; the rest map onto
the kiln op of the same name through the default handler.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import LEGACY_IGNORED, onnx_op
from kiln.frontend.onnx.tensors import dtype_from_onnx
from kiln.ir.graph import Value
from kiln.ir.ops import OPS
from kiln.ir.ops.base import const_value


def _attrs(n: NodeCtx, known: tuple[str, ...]) -> dict[str, Any]:
    """The node's attributes less the legacy memory hints; raises on any attribute not in `known`."""
    out = {k: v for k, v in n.attrs.items() if k not in LEGACY_IGNORED}
    for k in out:
        if k not in known:
            raise n.fail(f"attribute '{k}' is not supported by kiln's {n.op_type}")
    return out


def _append_ones(n: NodeCtx, v: Value, count: int, at: int) -> Value:
    """v with `count` size-1 dims inserted at position `at` (a constant is reshaped in place)."""
    if count == 0:
        return v
    c = const_value(v)
    if isinstance(c, torch.Tensor):
        new_shape = (*c.shape[:at], *([1] * count), *c.shape[at:])
        return n.const(c.reshape(new_shape), v.dtype, hint="broadcast")
    if "Unsqueeze" not in OPS:
        raise n.fail("legacy broadcasting of a computed input needs kiln's Unsqueeze op")
    axes = n.const(torch.arange(at, at + count, dtype=torch.int64), hint="axes")
    return n.emit("Unsqueeze", [v, axes], outputs=1)[0]


# --- opset <= 6 binary ops: `broadcast` / `axis` -----------------------------------------------------------


def _legacy_binary(n: NodeCtx) -> list[Value]:
    """broadcast=1 aligns B with A starting at `axis` (default: B's dims are A's trailing dims). Without it
    the shapes had to match; numpy broadcasting agrees on every such pair."""
    attrs = _attrs(n, ("broadcast", "axis"))
    a, b = n.inputs[0], n.inputs[1]
    axis = attrs.get("axis")
    if attrs.get("broadcast", 0) and axis is not None and a is not None and b is not None:
        ra, rb = a.rank, b.rank
        if ra is None or rb is None:
            raise n.fail("legacy broadcasting with 'axis' needs inputs of known rank")
        axis = int(axis) + ra if int(axis) < 0 else int(axis)
        trailing = ra - axis - rb
        if trailing < 0 or axis < 0:
            raise n.fail(f"B (rank {rb}) does not fit in A (rank {ra}) at axis {attrs['axis']}")
        b = _append_ones(n, b, trailing, rb)
    return n.emit(n.op_type, [a, b])


for _op in ("Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Greater", "Less"):
    onnx_op(_op, since=1)(_legacy_binary)
    onnx_op(_op, since=7)(lambda n: n.default())


# --- other version differences --------------------------------------------------------------------------


@onnx_op("PRelu", since=1)
def prelu_legacy(n: NodeCtx) -> list[Value]:
    """Before opset 7 a 1-D slope of size C applied along the channel axis (axis 1), not the last axis."""
    _attrs(n, ())
    x, slope = n.inputs
    assert x is not None and slope is not None
    s_shape, x_shape = slope.shape, x.shape
    if s_shape is None or x_shape is None or len(s_shape) != 1 or s_shape[0] == 1 or len(x_shape) <= 2:
        return n.emit("PRelu", [x, slope])
    channels = x_shape[1]
    if isinstance(channels, int) and isinstance(s_shape[0], int) and channels != s_shape[0]:
        raise n.fail(f"slope of size {s_shape[0]} does not match the {channels} channels of X")
    slope = _append_ones(n, slope, len(x_shape) - 2, 1)
    return n.emit("PRelu", [x, slope])


@onnx_op("PRelu", since=7)
def prelu(n: NodeCtx) -> list[Value]:
    return n.default()


@onnx_op("Clip", since=1)
def clip_legacy(n: NodeCtx) -> list[Value]:
    """Before opset 11 the bounds were float attributes; they become constants of the input's dtype."""
    attrs = _attrs(n, ("min", "max"))
    x = n.inputs[0]
    assert x is not None
    bounds = [None if attrs.get(k) is None else
              n.const(torch.tensor(float(attrs[k]), dtype=torch.float64).to(x.dtype.torch), x.dtype, hint=k)
              for k in ("min", "max")]
    return n.emit("Clip", [x, *bounds])


@onnx_op("Clip", since=11)
def clip(n: NodeCtx) -> list[Value]:
    return n.default()


@onnx_op("Cast", since=1)
def cast_legacy(n: NodeCtx) -> list[Value]:
    """Opset 1 named the target type with a string ('FLOAT', 'INT64', ...)."""
    attrs = _attrs(n, ("to",))
    to = attrs.get("to")
    if not isinstance(to, str):
        raise n.fail("attribute 'to' must name a type")
    try:
        code = onnx.TensorProto.DataType.Value(to.upper())
    except ValueError:
        raise n.fail(f"attribute 'to' names no ONNX type: '{to}'") from None
    return n.emit("Cast", n.inputs, {"to": dtype_from_onnx(code, "attribute 'to'")})


@onnx_op("Cast", since=6)
def cast(n: NodeCtx) -> list[Value]:
    return n.default()


@onnx_op("CastLike", since=15)
def cast_like(n: NodeCtx) -> list[Value]:
    """Cast to the dtype of the second input (only its type is read)."""
    attrs = _attrs(n, ("saturate", "round_mode"))
    x, like = n.inputs[0], n.inputs[1]
    if like is None:
        raise n.fail("input 'target_type' is required")
    return n.emit("Cast", [x], {"to": like.dtype, **attrs})
