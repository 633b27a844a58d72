"""Convolutions: symbolic shape inference, attribute validation, and behaviour the ONNX backend suite does not
cover (N-D convolution, per-channel integer zero points, padding corner cases), checked against onnxruntime,
ONNX's reference evaluator or a brute-force numpy convolution."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir import symbolic as sym
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ShapeError, UnsupportedError
from tests.ir.ops.single_node import single_node_model as _model

F32 = DType.FLOAT32
RNG = np.random.default_rng(1)


def _rnd(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def _graph(*shapes: Any, dtype: DType = F32) -> tuple[Graph, list]:
    g = Graph()
    return g, [g.add_input(f"x{i}", TensorType(dtype, s)) for i, s in enumerate(shapes)]



def _kiln(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(Interpreter(import_model(m)).run(feeds).values())


def _ort(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _eval(d: sym.Dim, **bindings: int) -> int:
    return sym.evaluate(d, bindings)


# --- shape inference ----------------------------------------------------------------------------------


def test_conv_symbolic_explicit_pads() -> None:
    g, (x, w) = _graph(("N", 3, "H", "W"), (8, 3, 3, 2))
    (y,) = g.add("Conv", [x, w], {"pads": [1, 0, 2, 1], "strides": [2, 3], "dilations": [2, 1]})
    n, m, h, wd = y.type.shape
    assert (n, m) == ("N", 8)
    for hh, ww in ((5, 2), (6, 3), (7, 7), (10, 8), (11, 4)):
        assert _eval(h, H=hh) == (hh + 3 - 5) // 2 + 1
        assert _eval(wd, W=ww) == (ww + 1 - 2) // 3 + 1


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_symbolic_auto_pad(auto_pad: str) -> None:
    g, (x, w) = _graph((1, 3, "H", 9), (4, 3, 3, 3))
    (y,) = g.add("Conv", [x, w], {"auto_pad": auto_pad, "strides": [2, 2]})
    h = y.type.shape[2]
    for hh in range(3, 12):
        want = -(-hh // 2) if auto_pad != "VALID" else (hh - 3) // 2 + 1
        assert _eval(h, H=hh) == want
    assert y.type.shape[3] == (5 if auto_pad != "VALID" else 4)


def test_conv_unknown_rank_and_weight_rank() -> None:
    g, (x, w) = _graph(None, None)
    (y,) = g.add("Conv", [x, w])
    assert y.type.shape is None
    g, (x, w) = _graph(None, (4, 3, 3, 3))
    (y,) = g.add("Conv", [x, w])
    assert len(y.type.shape) == 4 and y.type.shape[1] == 4


@pytest.mark.parametrize(
    ("attrs", "wshape", "message"),
    [
        ({"pads": [1, 1, 1]}, (4, 3, 3, 3), "pads has 3 values"),
        ({"strides": [1]}, (4, 3, 3, 3), "strides has 1 values"),
        ({"kernel_shape": [3, 2]}, (4, 3, 3, 3), "does not match the weight"),
        ({"group": 2}, (4, 3, 3, 3), "expects 3 x group 2"),
        ({}, (4, 3, 9, 3), "too small for kernel"),
    ],
)
def test_conv_validation(attrs: dict, wshape: tuple, message: str) -> None:
    g, (x, w) = _graph((1, 3, 5, 5), wshape)
    with pytest.raises(ShapeError, match=message):
        g.add("Conv", [x, w], attrs)


def test_conv_bias_shape_checked() -> None:
    g, (x, w, b) = _graph((1, 3, 5, 5), (4, 3, 3, 3), (5,))
    with pytest.raises(ShapeError, match=r"bias must have shape \[4\]"):
        g.add("Conv", [x, w, b])


def test_conv_rejects_unknown_auto_pad_and_integer_input() -> None:
    g, (x, w) = _graph((1, 3, 5, 5), (4, 3, 3, 3))
    with pytest.raises(UnsupportedError, match="auto_pad"):
        g.add("Conv", [x, w], {"auto_pad": "SAME"})
    g, (x, w) = _graph((1, 3, 5, 5), (4, 3, 3, 3), dtype=DType.INT32)
    with pytest.raises(UnsupportedError, match="int32"):
        g.add("Conv", [x, w])


def test_conv_transpose_symbolic() -> None:
    g, (x, w) = _graph(("N", 4, "H", "W"), (4, 3, 3, 2))
    (y,) = g.add("ConvTranspose", [x, w], {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 2],
                                          "group": 2})
    n, m, h, wd = y.type.shape
    assert (n, m) == ("N", 6)
    assert _eval(h, H=5) == 2 * 4 + 3 + 1 - 1 and _eval(wd, W=4) == 3 * 3 + 2 + 2 - 1
    (y,) = g.add("ConvTranspose", [x, w], {"strides": [2, 2], "auto_pad": "SAME_LOWER"})
    assert _eval(y.type.shape[2], H=7) == 14
    (y,) = g.add("ConvTranspose", [x, w], {"output_shape": [1, 4, 10, 11]})  # N and C included: ignored
    assert y.type.shape[2:] == (10, 11)


def test_conv_transpose_more_than_3d_is_unsupported() -> None:
    g, (x, w) = _graph((1, 2, 3, 3, 3, 3), (2, 2, 2, 2, 2, 2))
    with pytest.raises(UnsupportedError, match="4 spatial axes"):
        g.add("ConvTranspose", [x, w])


def test_causal_conv_state_shape() -> None:
    g, (x, w) = _graph(("B", 4, "L"), (4, 1, 3))
    y, state = g.add("CausalConvWithState", [x, w], outputs=2)
    assert y.type.shape == ("B", 4, "L") and state.type.shape == ("B", 4, 2)


def test_col2im_runtime_image_shape_gives_fresh_dims() -> None:
    g, (x,) = _graph((2, 12, "L"))
    image = g.add_input("img", TensorType(DType.INT64, (2,)))
    block = g.add_initializer("b", torch.tensor([2, 3]))
    (y,) = g.add("Col2Im", [x, image, block])
    assert y.type.shape[:2] == (2, 2) and all(isinstance(d, str) for d in y.type.shape[2:])


def test_deform_conv_offset_channels_checked() -> None:
    g, (x, w, off) = _graph((1, 4, 6, 6), (2, 4, 3, 3), (1, 10, 4, 4))
    with pytest.raises(ShapeError, match="offset has 10 channels"):
        g.add("DeformConv", [x, w, off])


# --- values -------------------------------------------------------------------------------------------


def _brute_conv(x: np.ndarray, w: np.ndarray, strides: list[int], pads: list[int]) -> np.ndarray:
    n = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0), *[(pads[i], pads[i + n]) for i in range(n)]])
    outs = [(xp.shape[i + 2] - w.shape[i + 2]) // strides[i] + 1 for i in range(n)]
    y = np.zeros((x.shape[0], w.shape[0], *outs), np.float64)
    for o in itertools.product(*[range(v) for v in outs]):
        sl = tuple(slice(o[i] * strides[i], o[i] * strides[i] + w.shape[i + 2]) for i in range(n))
        patch = xp[(slice(None), slice(None), *sl)]
        axes = list(range(1, n + 2))
        y[(slice(None), slice(None), *o)] = np.tensordot(patch, w, axes=(axes, axes))
    return y


def test_conv_with_four_spatial_axes() -> None:
    x, w = _rnd(1, 2, 4, 3, 5, 4), _rnd(3, 2, 2, 2, 3, 2)
    m = _model("Conv", {"x": x, "w": w}, pads=[1, 0, 0, 1, 0, 1, 1, 0], strides=[2, 1, 2, 1])
    (y,) = _kiln(m, {"x": x, "w": w})
    want = _brute_conv(x, w, [2, 1, 2, 1], [1, 0, 0, 1, 0, 1, 1, 0])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_conv_float64_and_float16() -> None:
    x, w = _rnd(1, 2, 6, 5), _rnd(3, 2, 3, 3)
    for dt, tol in ((np.float64, 1e-12), (np.float16, 2e-2)):
        xd, wd = x.astype(dt), w.astype(dt)
        (y,) = _kiln(_model("Conv", {"x": xd, "w": wd}, pads=[1, 1, 1, 1]), {"x": xd, "w": wd})
        assert y.dtype == dt
        np.testing.assert_allclose(y, _brute_conv(xd.astype(np.float64), wd.astype(np.float64), [1, 1],
                                                  [1, 1, 1, 1]), rtol=tol, atol=tol)


@pytest.mark.parametrize("auto_pad", ["NOTSET", "SAME_UPPER", "SAME_LOWER"])
def test_conv_transpose_output_one_larger_than_natural(auto_pad: str) -> None:
    # The natural size is 2*3 + 3 = 9; a requested 10 keeps the start and adds the element at the end.
    x, w = _rnd(1, 2, 4, 4), _rnd(2, 3, 3, 3)
    m = _model("ConvTranspose", {"x": x, "w": w}, strides=[2, 2], output_shape=[10, 9], auto_pad=auto_pad)
    (got,), (want,) = _kiln(m, {"x": x, "w": w}), _ort(m, {"x": x, "w": w})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_integer_per_channel_weight_zero_point() -> None:
    x = RNG.integers(0, 255, (1, 3, 6, 5)).astype(np.uint8)
    w = RNG.integers(-128, 127, (4, 3, 2, 3)).astype(np.int8)
    zx, zw = np.array(7, np.uint8), np.array([1, -3, 0, 5], np.int8)
    m = _model("ConvInteger", {"x": x, "w": w, "zx": zx, "zw": zw}, opset=10, pads=[1, 0, 0, 1])
    feeds = {"x": x, "w": w, "zx": zx, "zw": zw}
    (got,) = _kiln(m, feeds)
    (want,) = ReferenceEvaluator(m).run(None, feeds)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_qlinear_conv_per_channel_matches_onnxruntime() -> None:
    x = RNG.integers(0, 255, (1, 3, 7, 6)).astype(np.uint8)
    w = RNG.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8)
    consts = {"ws": np.array([0.05, 0.02, 0.03, 0.01], np.float32), "wz": np.zeros(4, np.int8),
              "ys": np.array(0.7, np.float32), "yz": np.array(120, np.uint8),
              "b": RNG.integers(-1000, 1000, 4).astype(np.int32)}
    feeds = {"x": x, "xs": np.array(0.05, np.float32), "xz": np.array(10, np.uint8), "w": w}
    node_inputs = {"x": x, "xs": feeds["xs"], "xz": feeds["xz"], "w": w}
    m = _model("QLinearConv", node_inputs, opset=10, consts=consts, pads=[1, 1, 1, 1])
    order = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
    del m.graph.node[0].input[:]
    m.graph.node[0].input.extend(order)
    (got,), (want,) = _kiln(m, feeds), _ort(m, feeds)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_deform_conv_matches_onnxruntime() -> None:
    x, w, b = _rnd(1, 4, 6, 7), _rnd(6, 2, 3, 2), _rnd(6)
    off, mask = _rnd(1, 2 * 6 * 2, 5, 6) * 1.5, RNG.random((1, 2 * 6, 5, 6)).astype(np.float32)
    feeds = {"x": x, "w": w, "off": off, "b": b, "mask": mask}
    m = _model("DeformConv", feeds, group=2, offset_group=2, pads=[1, 0, 0, 0])
    (got,), (want,) = _kiln(m, feeds), _ort(m, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_col2im_three_spatial_axes_with_pads_matches_onnxruntime() -> None:
    data = _rnd(2, 3 * 12, 3 * 5 * 6)
    consts = {"img": np.array([4, 5, 6], np.int64), "blk": np.array([2, 2, 3], np.int64)}
    m = _model("Col2Im", {"x": data}, opset=18, consts=consts, pads=[0, 1, 1, 0, 0, 1])
    (got,), (want,) = _kiln(m, {"x": data}), _ort(m, {"x": data})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
