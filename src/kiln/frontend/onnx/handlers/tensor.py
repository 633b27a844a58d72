"""ONNX handlers: tensor creation, shape manipulation and indexing.

kiln's ops follow the newest ONNX versions; the handlers here turn older versions into them (attributes that
later became inputs become constant inputs, legacy defaults and semantics are made explicit). Versions that
match kiln's op go through the default handler, registered explicitly where an older handler would otherwise
cover them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import LEGACY_IGNORED, onnx_op
from kiln.ir.dtype import DType
from kiln.ir.graph import Value


@onnx_op("Constant")
def constant(n: NodeCtx) -> list[Value]:
    """All value_* forms become one tensor attribute."""
    a = n.attrs
    if "value" in a or "sparse_value" in a:
        data = a.get("value", a.get("sparse_value"))
        dtype = _tensor_dtype(n, "value") if "value" in a else None
    elif "value_float" in a:
        data, dtype = torch.tensor(a["value_float"], dtype=torch.float32), DType.FLOAT32
    elif "value_floats" in a:
        data, dtype = torch.tensor(a["value_floats"], dtype=torch.float32), DType.FLOAT32
    elif "value_int" in a:
        data, dtype = torch.tensor(a["value_int"], dtype=torch.int64), DType.INT64
    elif "value_ints" in a:
        data, dtype = torch.tensor(a["value_ints"], dtype=torch.int64), DType.INT64
    elif "value_string" in a:
        data, dtype = np.array(a["value_string"], dtype=object), DType.STRING
    elif "value_strings" in a:
        data, dtype = np.array(list(a["value_strings"]), dtype=object), DType.STRING
    else:
        raise n.fail("Constant has no value attribute")
    narrow = dtype if dtype is not None and dtype.is_narrow else None
    return n.emit("Constant", [], {"value": data, "dtype": narrow})


def _tensor_dtype(n: NodeCtx, attr: str) -> DType | None:
    """The declared element type of a TENSOR attribute (needed for narrow types stored widened)."""
    for a in n.proto.attribute:
        if a.name == attr:
            from kiln.frontend.onnx.tensors import dtype_from_onnx

            return dtype_from_onnx(a.t.data_type)
    return None


# --- helpers ------------------------------------------------------------------------------------------


def _only(n: NodeCtx, allowed: set[str]) -> None:
    """Fail on any attribute this handler does not translate."""
    for k in n.attrs:
        if k not in allowed and k not in LEGACY_IGNORED:
            raise n.fail(f"attribute '{k}' of {n.op_type}-{n.since} is not supported")


def _required(n: NodeCtx, name: str) -> Any:
    if name not in n.attrs:
        raise n.fail(f"{n.op_type}-{n.since} needs the '{name}' attribute")
    return n.attrs[name]


def _i64(n: NodeCtx, values: Sequence[int], hint: str) -> Value:
    return n.const(np.asarray(list(values), dtype=np.int64), DType.INT64, hint)


def _default(n: NodeCtx) -> list[Value]:
    return n.default()


# --- attributes that became inputs --------------------------------------------------------------------


@onnx_op("Reshape", since=1)
def reshape_v1(n: NodeCtx) -> list[Value]:
    """Reshape-1: `shape` is an attribute."""
    _only(n, {"shape"})
    return n.emit("Reshape", [n.inputs[0], _i64(n, _required(n, "shape"), "shape")])


onnx_op("Reshape", since=5)(_default)


def _axes_to_input(n: NodeCtx, required: bool) -> list[Value]:
    _only(n, {"axes"})
    axes = _required(n, "axes") if required else n.attrs.get("axes")
    ins = [n.inputs[0]] + ([_i64(n, axes, "axes")] if axes is not None else [])
    return n.emit(n.op_type, ins)


@onnx_op("Squeeze", since=1)
def squeeze_v1(n: NodeCtx) -> list[Value]:
    """Squeeze-1/11: `axes` is an (optional) attribute."""
    return _axes_to_input(n, required=False)


@onnx_op("Unsqueeze", since=1)
def unsqueeze_v1(n: NodeCtx) -> list[Value]:
    """Unsqueeze-1/11: `axes` is a required attribute."""
    return _axes_to_input(n, required=True)


onnx_op("Squeeze", since=13)(_default)
onnx_op("Unsqueeze", since=13)(_default)


@onnx_op("Slice", since=1)
def slice_v1(n: NodeCtx) -> list[Value]:
    """Slice-1: starts/ends/axes are attributes and there are no steps."""
    _only(n, {"starts", "ends", "axes"})
    ins = [n.inputs[0], _i64(n, _required(n, "starts"), "starts"), _i64(n, _required(n, "ends"), "ends")]
    if n.attrs.get("axes") is not None:
        ins.append(_i64(n, n.attrs["axes"], "axes"))
    return n.emit("Slice", ins)


onnx_op("Slice", since=10)(_default)


@onnx_op("TopK", since=1)
def topk_v1(n: NodeCtx) -> list[Value]:
    """TopK-1: `k` is an attribute; largest/sorted came in TopK-11 (their defaults are TopK-1's behaviour)."""
    _only(n, {"k", "axis"})
    return n.emit("TopK", [n.inputs[0], _i64(n, [_required(n, "k")], "k")], {"axis": n.attrs.get("axis", -1)})


onnx_op("TopK", since=10)(_default)


# --- Split --------------------------------------------------------------------------------------------


def _emit_split(n: NodeCtx, ins: list[Value | None], attrs: dict[str, Any]) -> list[Value]:
    """Split's output count is its semantics: keep outputs the model leaves unnamed at the end."""
    count = len(n.output_names)
    if count == n.n_outputs:
        return n.emit("Split", ins, attrs)
    return n.emit("Split", ins, attrs, outputs=count)


def _equal_split(n: NodeCtx, axis: int) -> None:
    """Before Split-18 an equal split must divide the dim evenly (Split-18 makes the last part smaller)."""
    x = n.inputs[0]
    if x is None or x.shape is None:
        return
    r = len(x.shape)
    if not -r <= axis < r:
        raise n.fail(f"axis {axis} is out of range for rank {r}")
    d = x.shape[axis]
    if isinstance(d, int) and d % len(n.output_names):
        raise n.fail(f"dim {d} cannot be split into {len(n.output_names)} equal parts")


def _split_legacy(n: NodeCtx, split: Sequence[int] | None) -> list[Value]:
    axis = n.attrs.get("axis", 0)
    if split is None:
        _equal_split(n, axis)
        return _emit_split(n, [n.inputs[0]], {"axis": axis})
    return _emit_split(n, [n.inputs[0], _i64(n, split, "split")], {"axis": axis})


@onnx_op("Split", since=1)
def split_v1(n: NodeCtx) -> list[Value]:
    """Split-1: sizes from the `split` attribute or a second input (which kiln needs constant)."""
    _only(n, {"split", "axis"})
    split = n.attrs.get("split")
    if split is None and n.input(1) is not None:
        c = n.const_input(1)
        if c is None:
            raise n.fail("Split-1 with a computed 'split' input is not supported (it must be a constant)")
        split = [int(v) for v in c.reshape(-1).tolist()]
    return _split_legacy(n, split)


@onnx_op("Split", since=2)
def split_v2(n: NodeCtx) -> list[Value]:
    """Split-2/11: sizes from the `split` attribute, else equal parts."""
    _only(n, {"split", "axis"})
    return _split_legacy(n, n.attrs.get("split"))


@onnx_op("Split", since=13)
def split_v13(n: NodeCtx) -> list[Value]:
    """Split-13: sizes from the optional input, else equal parts (no num_outputs yet)."""
    _only(n, {"axis"})
    if n.input(1) is None:
        _equal_split(n, n.attrs.get("axis", 0))
    return _emit_split(n, n.inputs, {"axis": n.attrs.get("axis", 0)})


@onnx_op("Split", since=18)
def split_v18(n: NodeCtx) -> list[Value]:
    _only(n, {"axis", "num_outputs"})
    return _emit_split(n, n.inputs, dict(n.attrs))


# --- Pad ----------------------------------------------------------------------------------------------


def _pad_legacy(n: NodeCtx, key: str) -> list[Value]:
    _only(n, {key, "mode", "value"})
    x = n.inputs[0]
    mode = n.attrs.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        raise n.fail(f"mode '{mode}' is not defined for Pad-{n.since}")
    assert x is not None
    ins = [x, _i64(n, _required(n, key), "pads")]
    value = float(n.attrs.get("value", 0.0))
    if mode == "constant" and value != 0.0:
        ins.append(n.const(torch.tensor(value, dtype=torch.float64), x.dtype, "value"))
    return n.emit("Pad", ins, {"mode": mode})


@onnx_op("Pad", since=1)
def pad_v1(n: NodeCtx) -> list[Value]:
    """Pad-1: `paddings` and `value` attributes."""
    return _pad_legacy(n, "paddings")


@onnx_op("Pad", since=2)
def pad_v2(n: NodeCtx) -> list[Value]:
    """Pad-2: `pads` and `value` attributes."""
    return _pad_legacy(n, "pads")


@onnx_op("Pad", since=11)
def pad_v11(n: NodeCtx) -> list[Value]:
    """Pad-11/13/18: inputs as today, but no 'wrap' mode (Pad-19)."""
    if n.attrs.get("mode") == "wrap":
        raise n.fail(f"mode 'wrap' is not defined for Pad-{n.since} (it came in Pad-19)")
    return n.default()


onnx_op("Pad", since=19)(_default)


# --- legacy defaults and semantics --------------------------------------------------------------------


@onnx_op("Concat", since=1)
def concat_v1(n: NodeCtx) -> list[Value]:
    """Concat-1: `axis` is optional and defaults to 1."""
    _only(n, {"axis"})
    return n.emit("Concat", n.inputs, {"axis": n.attrs.get("axis", 1)})


onnx_op("Concat", since=4)(_default)


@onnx_op("Dropout", since=1)
def dropout_legacy(n: NodeCtx) -> list[Value]:
    """Dropout-1..10: `ratio` (and in 1/6 `is_test`) are attributes and the mode is not an input. kiln builds
    inference engines, so these run in test mode: the output is the input, the mask all ones. Before
    Dropout-10 the mask has the data's type, not bool."""
    _only(n, {"ratio", "is_test"})
    x = n.inputs[0]
    assert x is not None
    if n.n_outputs < 2 or n.since >= 10:
        return n.emit("Dropout", [x])
    y = n.emit("Dropout", [x], outputs=1)[0]
    shape = n.emit("Shape", [x], outputs=1)[0]
    one = torch.ones(1, dtype=x.dtype.torch)
    return [y, n.emit("ConstantOfShape", [shape], {"value": one}, outputs=1)[0]]


onnx_op("Dropout", since=12)(_default)


@onnx_op("Scatter", since=9)
def scatter(n: NodeCtx) -> list[Value]:
    """Scatter (deprecated in opset 11) is ScatterElements without reduction."""
    _only(n, {"axis"})
    return n.emit("ScatterElements", n.inputs, {"axis": n.attrs.get("axis", 0)})


def _reduction_v16(n: NodeCtx) -> list[Value]:
    """ScatterElements/ScatterND-16 know reductions none/add/mul; max and min came in version 18."""
    r = n.attrs.get("reduction", "none")
    if r not in ("none", "add", "mul"):
        raise n.fail(f"reduction '{r}' is not defined for {n.op_type}-{n.since} (it came in version 18)")
    return n.default()


for _op in ("ScatterElements", "ScatterND"):
    onnx_op(_op, since=16)(_reduction_v16)
    onnx_op(_op, since=18)(_default)


@onnx_op("Tile", since=1)
def tile_v1(n: NodeCtx) -> list[Value]:
    """Tile-1: repeat `tiles` times along `axis` (both inputs, which kiln needs constant)."""
    x, tiles, axis = n.input(0), n.const_input(1), n.const_input(2)
    if x is None or tiles is None or axis is None:
        raise n.fail("Tile-1 needs constant 'tiles' and 'axis' inputs")
    if x.rank is None:
        raise n.fail("Tile-1 needs an input of known rank")
    a = int(axis.reshape(-1)[0])
    if not -x.rank <= a < x.rank:
        raise n.fail(f"axis {a} is out of range for rank {x.rank}")
    reps = [1] * x.rank
    reps[a % x.rank] = int(tiles.reshape(-1)[0])
    return n.emit("Tile", [x, _i64(n, reps, "repeats")])


onnx_op("Tile", since=6)(_default)


@onnx_op("OneHot", since=9)
def onehot_v9(n: NodeCtx) -> list[Value]:
    """OneHot-9 gives all-off rows for negative indices; kiln's OneHot (version 11) counts them from the back,
    so rows of negative indices are set back to the off value."""
    _only(n, {"axis"})
    idx, values = n.input(0), n.input(2)
    assert idx is not None and values is not None
    c = n.const_input(0)
    unsigned = idx.dtype.is_int and not idx.dtype.is_signed
    if unsigned or (isinstance(c, torch.Tensor) and not bool((c < 0).any())):
        return n.default()
    axis = n.attrs.get("axis", -1)
    if idx.rank is None:
        raise n.fail("OneHot-9 with possibly negative indices needs indices of known rank")
    r = idx.rank + 1
    if not -r <= axis < r:
        raise n.fail(f"axis {axis} is out of range for rank {r}")
    hot = n.emit("OneHot", n.inputs, {"axis": axis}, outputs=1)[0]
    zero = n.const(torch.zeros((), dtype=idx.dtype.torch), idx.dtype, "zero")
    neg = n.emit("Less", [idx, zero], outputs=1)[0]
    neg = n.emit("Unsqueeze", [neg, _i64(n, [axis % r], "axis")], outputs=1)[0]
    first = n.const(torch.tensor(0, dtype=torch.int64), DType.INT64, "off")
    off = n.emit("Gather", [values, first], outputs=1)[0]
    return n.emit("Where", [neg, off, hot])


onnx_op("OneHot", since=11)(_default)


@onnx_op("ConstantOfShape", since=9)
def constant_of_shape(n: NodeCtx) -> list[Value]:
    """The value tensor's declared type is kept for narrow types (stored widened)."""
    _only(n, {"value"})
    attrs: dict[str, Any] = {}
    if "value" in n.attrs:
        attrs["value"] = n.attrs["value"]
        dt = _tensor_dtype(n, "value")
        if dt is not None and dt.is_narrow:
            attrs["dtype"] = dt
    return n.emit("ConstantOfShape", n.inputs, attrs)
