"""Pooling: symbolic shape inference (auto_pad, ceil_mode), old ONNX versions, and behaviour the ONNX backend
suite does not cover (3-D Indices in both storage orders, count_include_pad with ceil_mode, MaxUnpool with an
output_shape, MaxRoiPool), checked against onnxruntime or numpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir import symbolic as sym
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ShapeError, UnsupportedError
from tests.ir.ops.single_node import single_node_model as _model

RNG = np.random.default_rng(2)


def _rnd(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)



def _compare(m: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: float = 1e-5) -> list[np.ndarray]:
    got = list(Interpreter(import_model(m)).run(feeds).values())
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    return got


def _pool(op: str, shape: Any, dtype: DType = DType.FLOAT32, n_out: int = 1, **attrs: Any) -> list:
    g = Graph()
    x = g.add_input("x", TensorType(dtype, shape))
    return g.add(op, [x], attrs, outputs=n_out)


# --- shape inference ----------------------------------------------------------------------------------


def _ceil_out(size: int, k: int, s: int, pb: int, pe: int) -> int:
    out = -(-(size + pb + pe - k) // s) + 1
    return out - 1 if (out - 1) * s >= size + pb else out


def test_ceil_mode_symbolic_when_decidable() -> None:
    # kernel 3, stride 2, no end pad: a ceil window never starts in the padding.
    (y,) = _pool("MaxPool", ("N", 2, "H", 8), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    for h in range(3, 14):
        assert sym.evaluate(y.type.shape[2], {"H": h}) == -(-(h - 3) // 2) + 1
    assert y.type.shape[3] == 4  # static: ceil(5/2)+1 = 4, last window starts at 6 < 8
    # end padding >= kernel: the extra ceil window always starts in the padding and is dropped.
    (y,) = _pool("AveragePool", (1, 2, "H", 9), kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 2, 2],
                 ceil_mode=1)
    for h in range(2, 12):
        assert sym.evaluate(y.type.shape[2], {"H": h}) == _ceil_out(h, 2, 2, 0, 2)
    # undecidable: a fresh dim
    (y,) = _pool("MaxPool", (1, 2, "H", 9), kernel_shape=[2, 2], strides=[3, 3], ceil_mode=1)
    assert sym.symbols(y.type.shape[2]) and "H" not in sym.symbols(y.type.shape[2])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad_symbolic(auto_pad: str) -> None:
    y, idx = _pool("MaxPool", ("N", 3, "H", "W"), n_out=2, kernel_shape=[3, 2], strides=[2, 3],
                   auto_pad=auto_pad)
    assert idx.type.dtype == DType.INT64 and idx.type.shape == y.type.shape
    for h in range(3, 10):
        want = -(-h // 2) if auto_pad != "VALID" else (h - 3) // 2 + 1
        assert sym.evaluate(y.type.shape[2], {"H": h}) == want


def test_unknown_rank_and_global_pools() -> None:
    assert _pool("AveragePool", None, kernel_shape=[2, 2])[0].type.shape is None
    assert _pool("GlobalMaxPool", ("N", 8, "H", "W", 3))[0].type.shape == ("N", 8, 1, 1, 1)
    assert _pool("GlobalLpPool", None)[0].type.shape is None


@pytest.mark.parametrize(
    ("op", "dtype", "attrs", "error", "message"),
    [
        ("MaxPool", DType.FLOAT32, {"kernel_shape": [2]}, ShapeError, "kernel_shape has 1 values"),
        ("MaxPool", DType.INT32, {"kernel_shape": [2, 2]}, ShapeError, "int32 is not supported"),
        ("AveragePool", DType.INT8, {"kernel_shape": [2, 2]}, ShapeError, "int8 is not supported"),
        ("MaxPool", DType.FLOAT32, {"kernel_shape": [2, 2], "storage_order": 2}, UnsupportedError,
         "storage_order"),
        ("LpPool", DType.FLOAT32, {}, UnsupportedError, "kernel_shape' is required"),
    ],
)
def test_validation(op: str, dtype: DType, attrs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _pool(op, (1, 2, 5, 5), dtype, **attrs)


def test_max_unpool_output_shape_inference() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, ("N", 2, "H", 3)))
    i = g.add_input("i", TensorType(DType.INT64, ("N", 2, "H", 3)))
    (y,) = g.add("MaxUnpool", [x, i], {"kernel_shape": [2, 2], "strides": [2, 2]})
    assert y.type.shape[3] == 6 and sym.evaluate(y.type.shape[2], {"H": 4}) == 8
    shape = g.add_initializer("s", torch.tensor([1, 2, 9, 7]))
    (y,) = g.add("MaxUnpool", [x, i, shape], {"kernel_shape": [2, 2], "strides": [2, 2]})
    assert y.type.shape == (1, 2, 9, 7)


# --- values against onnxruntime -----------------------------------------------------------------------


@pytest.mark.parametrize("storage_order", [0, 1])
def test_max_pool_3d_indices(storage_order: int) -> None:
    x = _rnd(2, 2, 5, 6, 7)
    m = _model("MaxPool", {"x": x}, n_out=2, kernel_shape=[2, 3, 2], strides=[2, 1, 2],
               pads=[1, 0, 1, 1, 1, 0], storage_order=storage_order)
    _compare(m, {"x": x})


def test_max_pool_int8_dilated_ceil() -> None:
    x = RNG.integers(-128, 127, (1, 2, 9, 8)).astype(np.int8)
    _compare(_model("MaxPool", {"x": x}, kernel_shape=[2, 2], strides=[2, 3], dilations=[2, 2], ceil_mode=1,
                    pads=[1, 0, 1, 1]), {"x": x})


@pytest.mark.parametrize(("count_include_pad", "ceil_mode"), [(0, 1), (1, 1), (1, 0)])
def test_average_pool_divisor(count_include_pad: int, ceil_mode: int) -> None:
    x = _rnd(2, 3, 9, 8)
    _compare(_model("AveragePool", {"x": x}, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 2, 0, 1],
                    count_include_pad=count_include_pad, ceil_mode=ceil_mode), {"x": x})


def test_lp_pool_version_1_float_p() -> None:
    x = _rnd(1, 2, 6, 6)
    (want,) = _compare(_model("LpPool", {"x": x}, kernel_shape=[2, 3], p=3), {"x": x})
    (got,) = Interpreter(import_model(_model("LpPool", {"x": x}, opset=1, kernel_shape=[2, 3], p=3.0))).run(
        {"x": x}).values()
    np.testing.assert_array_equal(got, want)
    with pytest.raises(UnsupportedError, match="not an integer"):
        import_model(_model("LpPool", {"x": x}, opset=1, kernel_shape=[2, 3], p=2.5))


def test_global_lp_pool() -> None:
    x = _rnd(2, 3, 4, 5)
    m = _model("GlobalLpPool", {"x": x}, p=3)
    (y,) = Interpreter(import_model(m)).run({"x": x}).values()
    want = (np.abs(x.astype(np.float64)) ** 3).sum((2, 3), keepdims=True) ** (1 / 3)
    np.testing.assert_allclose(y, want, rtol=1e-5)


def test_max_unpool_indices_address_output_shape() -> None:
    # Pool a 7x7 input, unpool to 7x7: the values return to where they came from (as in onnxruntime).
    x = _rnd(1, 2, 7, 7)
    pool = _model("MaxPool", {"x": x}, n_out=2, kernel_shape=[2, 2], strides=[2, 2])
    y, idx = Interpreter(import_model(pool)).run({"x": x}).values()
    m = _model("MaxUnpool", {"y": y, "i": idx}, consts={"s": np.array([1, 2, 7, 7], np.int64)},
               kernel_shape=[2, 2], strides=[2, 2])
    (out,) = _compare(m, {"y": y, "i": idx})
    kept = out != 0
    np.testing.assert_array_equal(out[kept], x[kept])


def test_max_roi_pool() -> None:
    x = np.arange(2 * 1 * 6 * 5, dtype=np.float32).reshape(2, 1, 6, 5)
    rois = np.array([[1, 0, 0, 4, 5], [0, 1.4, 2.6, 3.2, 3.4], [0, 3, 3, 3, 3]], np.float32)
    m = _model("MaxRoiPool", {"x": x, "r": rois}, opset=1, pooled_shape=[2, 2], spatial_scale=1.0)
    (y,) = Interpreter(import_model(m)).run({"x": x, "r": rois}).values()
    assert y.shape == (3, 1, 2, 2)
    # roi 0 (batch 1) covers all 6x5: bins rows [0,3) [3,6), cols [0,3) [2,5) -> maxima at their last cells.
    np.testing.assert_array_equal(y[0, 0], x[1, 0][[[2, 2], [5, 5]], [[2, 4], [2, 4]]])
    # roi 1: x 1..3, y 3..3 (rounded) -> both row bins are row 3; column bins [1,3) and [2,4)
    np.testing.assert_array_equal(y[1, 0], [[x[0, 0, 3, 2], x[0, 0, 3, 3]], [x[0, 0, 3, 2], x[0, 0, 3, 3]]])
    np.testing.assert_array_equal(y[2, 0], np.full((2, 2), x[0, 0, 3, 3]))
