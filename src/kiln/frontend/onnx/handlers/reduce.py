"""ONNX handlers: reductions, softmax family, normalizations, Gemm.

kiln's ops follow the newest ONNX versions; these handlers bring the older versions to them:

- Reduce*: `axes` was an attribute before opset 13 (ReduceSum) / 18 (the others); it becomes a constant input.
- Softmax, LogSoftmax, Hardmax before 13 coerce the input to 2-D at `axis` (default 1) and work along the
  flattened trailing axes: lowered to Flatten -> op(axis=1) -> Reshape back, or to the op itself when the
  trailing axes are the last one (or all size 1), where both definitions agree.
- BatchNormalization before 14: `is_test` (< 7) or the number of outputs (7 to 13) selects training mode;
  `spatial=0` (< 9, per-activation statistics) in inference mode is lowered to elementwise ops.
- GroupNormalization 18 takes scale/bias per group; 21 per channel: they are expanded per channel.
- Gemm before 7 has a `broadcast` attribute; kiln's Gemm always broadcasts C (a superset of both settings).
All other versions of these ops map onto the kiln op of the same name (`NodeCtx.default`).
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import LEGACY_IGNORED, onnx_op
from kiln.ir.dtype import DType
from kiln.ir.graph import Value


def _check_attrs(n: NodeCtx, known: set[str]) -> None:
    for k in n.attrs:
        if k not in known and k not in LEGACY_IGNORED:
            raise n.fail(f"attribute '{k}' is not supported by kiln's {n.op_type} (opset {n.since} version)")


def _default(n: NodeCtx) -> list[Value]:
    return n.default()


def _x(n: NodeCtx, i: int = 0) -> Value:
    v = n.input(i)
    if v is None:
        raise n.fail(f"input {i} is required")
    return v


# --- Reduce* ------------------------------------------------------------------------------------------

_AXES_INPUT_SINCE = {
    "ReduceSum": 13, "ReduceMean": 18, "ReduceProd": 18, "ReduceMax": 18, "ReduceMin": 18, "ReduceL1": 18,
    "ReduceL2": 18, "ReduceSumSquare": 18, "ReduceLogSum": 18, "ReduceLogSumExp": 18,
}


def _reduce_axes_attr(n: NodeCtx) -> list[Value]:
    """axes attribute -> constant axes input (absent or empty: every axis, as before)."""
    _check_attrs(n, {"axes", "keepdims"})
    inputs: list[Value | None] = [_x(n)]
    axes = n.attrs.get("axes")
    if axes:
        inputs.append(n.const(torch.tensor(list(axes), dtype=torch.int64), DType.INT64, hint="axes"))
    return n.emit(n.op_type, inputs, {"keepdims": n.attrs.get("keepdims", 1)})


for _op, _since in _AXES_INPUT_SINCE.items():
    onnx_op(_op, since=1)(_reduce_axes_attr)
    onnx_op(_op, since=_since)(_default)


# --- Softmax, LogSoftmax, Hardmax ---------------------------------------------------------------------


def _coerced_2d(n: NodeCtx) -> list[Value]:
    """Opset < 13: the op over the input flattened to [prod(d[:axis]), prod(d[axis:])]."""
    _check_attrs(n, {"axis"})
    x = _x(n)
    axis = n.attrs.get("axis", 1)
    shape = x.shape
    if shape is not None:
        r = len(shape)
        if not -r <= axis < r:
            raise n.fail(f"axis {axis} is out of range for rank {r}")
        axis = axis + r if axis < 0 else axis
        if all(d == 1 for d in shape[axis + 1:]):
            return n.emit(n.op_type, [x], {"axis": axis})
    flat = n.emit("Flatten", [x], {"axis": axis}, outputs=1)[0]
    y = n.emit(n.op_type, [flat], {"axis": 1}, outputs=1)[0]
    if shape is not None and all(isinstance(d, int) for d in shape):
        target = n.const(torch.tensor(list(shape), dtype=torch.int64), DType.INT64, hint="shape")
    else:
        target = n.emit("Shape", [x], outputs=1)[0]
    return n.emit("Reshape", [y, target], {"allowzero": 1})


for _op in ("Softmax", "LogSoftmax", "Hardmax"):
    onnx_op(_op, since=1)(_coerced_2d)
    onnx_op(_op, since=13)(_default)


# --- BatchNormalization -------------------------------------------------------------------------------


@onnx_op("BatchNormalization", since=1)
def batchnorm_legacy(n: NodeCtx) -> list[Value]:
    """Opsets 1-9 (versions 1, 6, 7, 9)."""
    known = {"epsilon", "momentum"} | ({"is_test"} if n.since < 7 else set())
    known |= {"spatial"} if n.since < 9 else set()
    _check_attrs(n, known)
    if n.n_outputs > 3:
        raise n.fail("the saved_mean/saved_var outputs of training mode are not supported")
    training = n.attrs.get("is_test", 0) == 0 if n.since < 7 else n.n_outputs > 1
    eps = n.attrs.get("epsilon", 1e-5)
    if n.attrs.get("spatial", 1) == 0:
        if training:
            raise n.fail("spatial=0 (per-activation statistics) is supported in inference mode only")
        return _batchnorm_per_activation(n, eps)
    attrs = {"epsilon": eps, "momentum": n.attrs.get("momentum", 0.9), "training_mode": int(training)}
    return n.emit("BatchNormalization", [_x(n, i) for i in range(5)], attrs)


def _batchnorm_per_activation(n: NodeCtx, eps: float) -> list[Value]:
    """spatial=0: scale, B, mean, var are [C, D1, ..., Dn]; Y = (X - mean) / sqrt(var + eps) * scale + B."""
    x, scale, bias, mean, var = (_x(n, i) for i in range(5))
    if x.rank is not None:
        for p in (scale, bias, mean, var):
            if p.rank is not None and p.rank != max(x.rank - 1, 1):
                raise n.fail(f"with spatial=0 '{p.name}' must have rank {x.rank - 1} (C x D1 x ...), "
                             f"got {p.rank}")
    e = n.const(torch.tensor(eps, dtype=var.dtype.torch), var.dtype, hint="epsilon")
    std = n.emit("Sqrt", [n.emit("Add", [var, e], outputs=1)[0]], outputs=1)[0]
    centered = n.emit("Sub", [x, mean], outputs=1)[0]
    normed = n.emit("Div", [centered, std], outputs=1)[0]
    scaled = n.emit("Mul", [normed, scale], outputs=1)[0]
    return n.emit("Add", [scaled, bias])


onnx_op("BatchNormalization", since=14)(_default)


# --- GroupNormalization -------------------------------------------------------------------------------


@onnx_op("GroupNormalization", since=18)
def groupnorm_per_group(n: NodeCtx) -> list[Value]:
    """Opset 18's scale and bias hold one value per group: repeat each for the group's channels."""
    _check_attrs(n, {"num_groups", "epsilon"})
    x, scale, bias = (_x(n, i) for i in range(3))
    groups = n.attrs.get("num_groups")
    if groups is None:
        raise n.fail("attribute 'num_groups' is required")
    channels = x.shape[1] if x.shape is not None and len(x.shape) >= 2 else None
    if not isinstance(channels, int):
        raise n.fail("opset 18's per-group scale/bias needs a static channel count (dim 1 of X)",
                     hint="re-export with opset 21, where scale and bias are per channel")
    if groups <= 0 or channels % groups:
        raise n.fail(f"{channels} channels do not split into {groups} groups")
    group_of = torch.arange(channels, dtype=torch.int64) // (channels // groups)
    per_channel = [_per_channel(n, p, group_of, i) for i, p in ((1, scale), (2, bias))]
    attrs: dict[str, Any] = {"num_groups": groups, "epsilon": n.attrs.get("epsilon", 1e-5)}
    # Before 21 the statistics were computed in X's own precision.
    own = x.dtype in (DType.FLOAT64, DType.FLOAT16, DType.BFLOAT16)
    attrs["stash_type"] = x.dtype if own else DType.FLOAT32
    return n.emit("GroupNormalization", [x, *per_channel], attrs)


def _per_channel(n: NodeCtx, p: Value, group_of: torch.Tensor, i: int) -> Value:
    data = n.const_input(i)
    if isinstance(data, torch.Tensor):
        return n.const(data.reshape(-1)[group_of], p.dtype, hint=f"{p.name}_per_channel")
    idx = n.const(group_of, DType.INT64, hint="group_of_channel")
    return n.emit("Gather", [p, idx], {"axis": 0}, outputs=1)[0]


onnx_op("GroupNormalization", since=21)(_default)


# --- Gemm ---------------------------------------------------------------------------------------------


@onnx_op("Gemm", since=1)
def gemm(n: NodeCtx) -> list[Value]:
    """Before opset 7 a `broadcast` attribute allowed C to broadcast; kiln's Gemm always allows it."""
    known = {"alpha", "beta", "transA", "transB"} | ({"broadcast"} if n.since < 7 else set())
    _check_attrs(n, known)
    if n.attrs.get("broadcast", 0) not in (0, 1):
        raise n.fail(f"broadcast={n.attrs['broadcast']} is not 0 or 1")
    attrs = {k: v for k, v in n.attrs.items() if k != "broadcast" and k not in LEGACY_IGNORED}
    return n.emit("Gemm", list(n.inputs), attrs)
