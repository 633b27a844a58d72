"""QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear against onnxruntime, plus version handling."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ShapeError, UnsupportedError

F = DType.FLOAT32
RNG = np.random.default_rng(0)


def _model(op: str, x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, elem_out: int, opset: int,
           **attrs: object) -> onnx.ModelProto:
    inits = [onnx.numpy_helper.from_array(scale, "scale")]
    names = ["x", "scale"]
    if zp is not None:
        inits.append(helper.make_tensor("zp", _elem(zp), zp.shape, zp.reshape(-1).tolist()))
        names.append("zp")
    node = helper.make_node(op, names, ["y"], **attrs)
    g = helper.make_graph([node], "m", [helper.make_tensor_value_info("x", _elem(x), x.shape)],
                          [helper.make_tensor_value_info("y", elem_out, x.shape)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _elem(a: np.ndarray) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(a.dtype)


def _both(m: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    got = Interpreter(import_model(m)).run({"x": x})["y"]
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return got, sess.run(None, {"x": x})[0]


@pytest.mark.parametrize(("zp", "attrs", "scale_shape"), [
    (np.array(128, np.uint8), {}, ()),
    (np.array(-3, np.int8), {}, ()),
    (np.array([1, 2, 3], np.uint8), {"axis": 1}, (3,)),
    (np.array([0, 5, -5, 9], np.int16), {"axis": -1}, (4,)),
    (None, {"axis": 2, "block_size": 3}, (2, 3, 2)),
    (np.zeros((2, 3, 2), np.uint16), {"axis": 2, "block_size": 3}, (2, 3, 2)),
])
def test_quantize_integer_types_match_onnxruntime(zp: np.ndarray | None, attrs: dict,
                                                  scale_shape: tuple) -> None:
    x = (RNG.standard_normal((2, 3, 4)) * 300).astype(np.float32)
    x.flat[:4] = [0.5, 1.5, 2.5, -2.5]  # ties round to even
    scale = RNG.uniform(0.5, 3, scale_shape).astype(np.float32)
    if scale_shape == ():
        scale = np.array(1.0, np.float32)
    out_elem = _elem(zp) if zp is not None else TensorProto.UINT8
    got, want = _both(_model("QuantizeLinear", x, scale, zp, out_elem, 21, **attrs), x)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [ml_dtypes.int4, ml_dtypes.uint4])
def test_quantize_and_dequantize_int4(dtype: type) -> None:
    x = (RNG.standard_normal((3, 4)) * 8).astype(np.float32)
    scale = np.array([1.0, 2.0, 0.5], np.float32)
    zp = np.array([1, 0, 2], dtype)
    m = _model("QuantizeLinear", x, scale, zp, _elem(zp), 21, axis=0)
    q = Interpreter(import_model(m)).run({"x": x})["y"]
    assert q.dtype == dtype
    want = np.clip(np.rint(x / scale[:, None]) + zp.astype(np.int32)[:, None], *(
        (-8, 7) if dtype == ml_dtypes.int4 else (0, 15)))
    np.testing.assert_array_equal(q.astype(np.int32), want)
    dq = _model("DequantizeLinear", q, scale, zp, TensorProto.FLOAT, 21, axis=0)
    back = Interpreter(import_model(dq)).run({"x": q})["y"]
    np.testing.assert_allclose(back, (want - zp.astype(np.int32)[:, None]) * scale[:, None])


_F8_IN = np.array([0, 1.3, -2.7, 1e5, -1e5, 300, 470, np.inf, -np.inf], np.float32)
_E5M2 = {1: [0, 1.25, -2.5, 57344, -57344, 320, 448, 57344, -57344],
         0: [0, 1.25, -2.5, np.inf, -np.inf, 320, 448, np.inf, -np.inf]}


@pytest.mark.parametrize("saturate", [0, 1])
@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_quantize_float8_saturation(dtype: type, saturate: int) -> None:
    zp = np.zeros((), dtype)
    m = _model("QuantizeLinear", _F8_IN, np.array(1.0, np.float32), zp, _elem(zp), 19, saturate=saturate)
    got = Interpreter(import_model(m)).run({"x": _F8_IN})["y"]
    assert got.dtype == dtype
    if dtype == ml_dtypes.float8_e4m3fn:  # onnxruntime hands float8 back as raw bytes
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        want = sess.run(None, {"x": _F8_IN})[0].view(dtype).astype(np.float32)
    else:
        want = np.array(_E5M2[saturate], np.float32)
    np.testing.assert_array_equal(got.astype(np.float32), want)


def test_dequantize_matches_onnxruntime_per_axis_and_blocked() -> None:
    x = RNG.integers(0, 255, (2, 6, 3)).astype(np.uint8)
    for scale_shape, zp_shape, attrs in [((6,), (6,), {"axis": 1}), ((2, 2, 3), (2, 2, 3),
                                                                     {"axis": 1, "block_size": 4})]:
        scale = RNG.uniform(0.1, 2, scale_shape).astype(np.float32)
        zp = RNG.integers(0, 255, zp_shape).astype(np.uint8)
        got, want = _both(_model("DequantizeLinear", x, scale, zp, TensorProto.FLOAT, 21, **attrs), x)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_dequantize_output_dtype_and_float16_scale() -> None:
    x = np.array([-128, -1, 0, 5, 127], np.int8)
    m = _model("DequantizeLinear", x, np.array(0.5, np.float16), None, TensorProto.FLOAT16, 21)
    got = Interpreter(import_model(m)).run({"x": x})["y"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, x.astype(np.float16) * np.float16(0.5))
    m = _model("DequantizeLinear", x, np.array(0.5, np.float32), None, TensorProto.BFLOAT16, 23,
               output_dtype=TensorProto.BFLOAT16)
    got = Interpreter(import_model(m)).run({"x": x})["y"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), x * 0.5)


def test_quantize_precision_attribute() -> None:
    # float16 x / float16 scale in float32 precision keeps digits float16 division would round away.
    x = np.array([1000.0, 2049.0], np.float16)
    scale = np.array(3.0, np.float16)
    m16 = _model("QuantizeLinear", x, scale, None, TensorProto.UINT16, 23, output_dtype=TensorProto.UINT16)
    m32 = _model("QuantizeLinear", x, scale, None, TensorProto.UINT16, 23, output_dtype=TensorProto.UINT16,
                 precision=TensorProto.FLOAT)
    y16 = Interpreter(import_model(m16)).run({"x": x})["y"]
    y32 = Interpreter(import_model(m32)).run({"x": x})["y"]
    assert y32.tolist() == [333, 683]
    assert y16.tolist() == np.rint(x / scale).astype(np.uint16).tolist()


def test_output_dtype_zero_means_unset_and_must_match_the_zero_point() -> None:
    x = np.zeros(3, np.float32)
    m = _model("QuantizeLinear", x, np.array(1.0, np.float32), None, TensorProto.UINT8, 21, output_dtype=0)
    assert import_model(m).outputs[0].dtype is DType.UINT8
    m = _model("QuantizeLinear", x, np.array(1.0, np.float32), np.array(0, np.int8), TensorProto.INT8, 21,
               output_dtype=TensorProto.UINT8)
    with pytest.raises(ShapeError, match="differs from the zero point's type"):
        import_model(m)


def test_attributes_newer_than_the_version_are_refused() -> None:
    x = np.zeros(3, np.float32)
    m = _model("QuantizeLinear", x, np.array(1.0, np.float32), None, TensorProto.UINT8, 10, axis=0)
    with pytest.raises(UnsupportedError, match="'axis' is not part of QuantizeLinear-10"):
        import_model(m)
    m = _model("DequantizeLinear", np.zeros(3, np.uint8), np.array(1.0, np.float32), None, TensorProto.FLOAT,
               19, block_size=2)
    with pytest.raises(UnsupportedError, match="'block_size' is not part of DequantizeLinear-19"):
        import_model(m)


def test_scale_shapes_are_checked() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F, ("N", 4)))
    bad_axis = g.add_input("s", TensorType(F, (3,)))
    with pytest.raises(ShapeError, match="per-axis scale of 3 does not fit axis 1"):
        g.add("QuantizeLinear", [x, bad_axis], outputs=1)
    blocks = g.add_input("b", TensorType(F, ("N", 3)))
    with pytest.raises(ShapeError, match="does not fit x"):
        g.add("QuantizeLinear", [x, blocks], {"block_size": 2}, outputs=1)
    ok = g.add_input("ok", TensorType(F, ("N", 2)))
    (y,) = g.add("QuantizeLinear", [x, ok], {"block_size": 2}, outputs=1)
    assert y.type == TensorType(DType.UINT8, ("N", 4))
    unknown = g.add_input("u", TensorType(F, None))
    (z,) = g.add("DequantizeLinear", [g.add_input("q", TensorType(DType.INT8, None)), unknown], outputs=1)
    assert z.type == TensorType(F, None)


@pytest.mark.parametrize("x", [
    np.array([0, 2, -3, -2.5, 1.34, 0.5], np.float32),
    np.array([[1, 2.5], [3, 7]], np.float32),
    np.array([-1, -5.5, -0.25], np.float32),
])
def test_dynamic_quantize_matches_onnxruntime(x: np.ndarray) -> None:
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    g = helper.make_graph([node], "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                          [helper.make_tensor_value_info(n, t, None) for n, t in
                           (("y", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    got = Interpreter(import_model(m)).run({"x": x})
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(got["y"], want[0])
    np.testing.assert_allclose(got["s"], want[1])
    assert got["z"] == want[2]


def test_dynamic_quantize_all_zeros() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F, (3,)))
    g.outputs = g.add("DynamicQuantizeLinear", [x], outputs=["y", "s", "z"])
    out = Interpreter(g).run({"x": torch.zeros(3)})
    assert out["y"].tolist() == [0, 0, 0] and float(out["s"]) == 0 and int(out["z"]) == 0
