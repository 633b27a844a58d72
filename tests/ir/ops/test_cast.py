"""Cast and BitCast: inference, narrow and float8 rules, strings, bit reinterpretation, the ONNX handlers."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.ir.ops.cast import cast
from kiln.utils.errors import ExecutionError, ShapeError, UnsupportedError

D = DType


def _cast(x: Any, to: DType, src: DType | None = None, **attrs: Any) -> Any:
    """Run one Cast node through the interpreter (so dtypes and shapes are checked)."""
    a = np.asarray(x)
    src = src or D.from_numpy(a.dtype)
    g = Graph()
    v = g.add_input("x", TensorType(src, a.shape))
    g.outputs += g.add("Cast", [v], {"to": to, **attrs})
    return Interpreter(g).run([a if src is D.STRING else a.astype(src.numpy)])[0]


def _bitcast(x: torch.Tensor, src: DType, to: DType) -> torch.Tensor:
    g = Graph()
    v = g.add_input("x", TensorType(src, tuple(x.shape)))
    g.outputs += g.add("BitCast", [v], {"to": to})
    return Interpreter(g).run([x])[0]


# --- inference -----------------------------------------------------------------------------------------


def test_inference_keeps_shape() -> None:
    g = Graph()
    v = g.add_input("x", TensorType(D.FLOAT32, ("N", 3)))
    (y,) = g.add("Cast", [v], {"to": D.INT4})
    assert y.type == TensorType(D.INT4, ("N", 3))
    u = g.add_input("u", TensorType(D.FLOAT32, None))
    (z,) = g.add("BitCast", [u], {"to": D.UINT32})
    assert z.type == TensorType(D.UINT32, None)


@pytest.mark.parametrize("op, src, to, match", [
    ("BitCast", D.FLOAT32, D.FLOAT16, "widths differ"),
    ("BitCast", D.STRING, D.UINT8, "strings"),
    ("Cast", D.COMPLEX64, D.FLOAT32, "complex64"),
])
def test_inference_errors(op: str, src: DType, to: DType, match: str) -> None:
    g = Graph()
    v = g.add_input("x", TensorType(src, (2,)))
    with pytest.raises(ShapeError, match=match):
        g.add(op, [v], {"to": to})


@pytest.mark.parametrize("attrs", [{"saturate": 2}, {"round_mode": "even"}, {"to": D.INT8, "bits": 3}])
def test_attribute_validation(attrs: dict[str, Any]) -> None:
    g = Graph()
    v = g.add_input("x", TensorType(D.FLOAT32, (2,)))
    with pytest.raises(UnsupportedError):
        g.add("Cast", [v], {"to": D.INT8, **attrs})


# --- numbers -------------------------------------------------------------------------------------------


def test_float8_saturation_table() -> None:
    x = np.array([np.inf, -np.inf, 1e6, np.nan, -0.0, 0.3], np.float32)
    sat = _cast(x, D.FLOAT8_E4M3FN).astype(np.float32)
    assert sat[:3].tolist() == [448, -448, 448] and np.isnan(sat[3]) and np.signbit(sat[4])
    e4 = _cast(x, D.FLOAT8_E4M3FN, saturate=0).astype(np.float32)
    assert np.isnan(e4[:4]).all()
    e5 = _cast(x, D.FLOAT8_E5M2, saturate=0).astype(np.float32)
    assert e5[:3].tolist() == [np.inf, -np.inf, np.inf]
    uz = _cast(x, D.FLOAT8_E5M2FNUZ, saturate=0).astype(np.float32)
    assert np.isnan(uz[:4]).all() and not np.signbit(uz[4])
    assert _cast(x[5:], D.FLOAT8_E4M3FNUZ).astype(np.float32).tolist() == [0.3125]  # nearest, ties to even


def test_float8_to_itself_saturates_its_own_infinity() -> None:
    x = np.array([np.inf, 1.0], ml_dtypes.float8_e5m2)
    assert _cast(x, D.FLOAT8_E5M2).astype(np.float32).tolist() == [57344, 1]
    assert np.isinf(_cast(x, D.FLOAT8_E5M2, saturate=0).astype(np.float32)[0])


def test_sub_byte_integers_wrap() -> None:
    x = np.array([-9, -8, 7, 8, 15, 300], np.int64)
    assert _cast(x, D.INT4).astype(np.int64).tolist() == [7, -8, 7, -8, -1, -4]
    assert _cast(x, D.UINT4).astype(np.int64).tolist() == [7, 8, 7, 8, 15, 12]
    assert _cast(x, D.INT2).astype(np.int64).tolist() == [-1, 0, -1, 0, -1, 0]
    assert _cast(np.array([-2.7, 2.7, 5.5], np.float32), D.UINT2).astype(np.int64).tolist() == [2, 2, 1]


def test_float4_rounds_to_nearest_even_and_saturates() -> None:
    x = np.array([0.25, 0.75, 1.25, 2.5, 5.0, 7.0, -1e9, np.inf], np.float32)
    assert _cast(x, D.FLOAT4_E2M1).astype(np.float32).tolist() == [0, 1, 1, 2, 4, 6, -6, 6]
    f6 = _cast(np.array([9.0, 0.3], np.float64), D.FLOAT6_E2M3).astype(np.float32)
    assert f6.tolist() == [7.5, 0.25]


@pytest.mark.parametrize("mode, sat, want", [
    ("up", 1, [2.0**-127, 1, 4, 4, 2.0**127, 2.0**127, 2.0**-126]),
    ("down", 1, [2.0**-127, 1, 2, 2, 2.0**127, 2.0**127, 2.0**-127]),
    ("nearest", 1, [2.0**-127, 1, 4, 2, 2.0**127, 2.0**127, 2.0**-126]),
    ("up", 0, [np.nan, 1, 4, 4, np.nan, np.nan, 2.0**-126]),
    ("nearest", 0, [np.nan, 1, 4, 2, np.nan, 2.0**127, 2.0**-126]),
])
def test_e8m0_rounding(mode: str, sat: int, want: list[float]) -> None:
    x = np.array([0.0, 1.0, 3.0, 2.9, np.inf, 1.2 * 2.0**127, 1.6 * 2.0**-127], np.float32)
    got = _cast(x, D.FLOAT8_E8M0, saturate=sat, round_mode=mode).astype(np.float32)
    np.testing.assert_array_equal(got, np.array(want, np.float32))


def test_e8m0_smallest_power_is_exact() -> None:
    x = np.array([2.0**-127, 2.0**-127 * 0.6], np.float32)
    assert _cast(x, D.FLOAT8_E8M0).astype(np.float32).tolist() == [2.0**-127, 2.0**-127]
    assert np.isnan(_cast(x, D.FLOAT8_E8M0, saturate=0, round_mode="down").astype(np.float32)[1])


def test_plain_pairs_follow_c_conversions() -> None:
    assert _cast(np.array([200, -1, 70000], np.int32), D.INT8).tolist() == [-56, -1, 112]
    assert _cast(np.array([-1.9, 1.9, 0.0, np.nan], np.float32), D.BOOL).tolist() == [True, True, False, True]
    assert _cast(np.array([2**64 - 1], np.uint64), D.FLOAT16).tolist() == [np.inf]
    assert _cast(np.array([-3.9, 3.9], np.float64), D.INT16).tolist() == [-3, 3]
    b = _cast(np.array([0.47892547], np.float32), D.BFLOAT16)
    assert b.astype(np.float32).tolist() == [0.478515625]


# --- strings -------------------------------------------------------------------------------------------


def test_numbers_to_strings() -> None:
    f = np.array([0.47892547, 1e-7, np.nan, np.inf, -np.inf, 3.0, -0.0], np.float32)
    assert _cast(f, D.STRING).tolist() == ["0.47892547", "1e-07", "nan", "inf", "-inf", "3.0", "-0.0"]
    assert _cast(f[:1].astype(np.float16), D.STRING).tolist() == ["0.479"]
    assert _cast(np.array([2**64 - 1], np.uint64), D.STRING).tolist() == ["18446744073709551615"]
    assert _cast(np.array([True, False]), D.STRING).tolist() == ["True", "False"]
    assert _cast(np.array([-3, 7], np.int8), D.STRING, src=D.INT4).tolist() == ["-3", "7"]


def test_strings_to_numbers() -> None:
    s = np.array(["3.14", "1e-5", "1E8", "+INF", "inf", "-INF", "NaN", " 2 "], dtype=object)
    got = _cast(s, D.FLOAT32)
    want = np.array([3.14, 1e-5, 1e8, np.inf, np.inf, -np.inf, np.nan, 2], np.float32)
    np.testing.assert_array_equal(got, want)
    assert _cast(np.array(["100", "-5", "100.5", "300"], dtype=object), D.INT8).tolist() == [100, -5, 100, 44]
    assert _cast(np.array(["18446744073709551615"], dtype=object), D.UINT64).tolist() == [2**64 - 1]
    flags = np.array(["true", "0", "2.5", "False"], dtype=object)
    assert _cast(flags, D.BOOL).tolist() == [True, False, True, False]
    assert _cast(np.array(["1.3"], dtype=object), D.FLOAT8_E4M3FN).astype(np.float32).tolist() == [1.25]


def test_unparsable_string_is_an_error() -> None:
    with pytest.raises(ExecutionError, match="Hello"):
        _cast(np.array(["Hello"], dtype=object), D.FLOAT32)
    with pytest.raises(ExecutionError, match="no integer value"):
        _cast(np.array(["inf"], dtype=object), D.INT32)


# --- bitcast -------------------------------------------------------------------------------------------


def test_bitcast_matches_numpy_views() -> None:
    f = np.array([1.0, -2.5, 3.75], np.float32)
    assert _bitcast(torch.from_numpy(f), D.FLOAT32, D.INT32).numpy().tolist() == f.view(np.int32).tolist()
    u = np.array([1, 32768, 65535], np.uint16)
    assert _bitcast(torch.from_numpy(u), D.UINT16, D.INT16).numpy().tolist() == u.view(np.int16).tolist()
    h = np.array([1.5, -2.0], np.float16)
    bf = _bitcast(torch.from_numpy(h), D.FLOAT16, D.BFLOAT16)
    assert bf.view(torch.int16).tolist() == h.view(np.int16).tolist()
    b = torch.tensor([1, 0, 2], dtype=torch.uint8)
    assert _bitcast(b, D.UINT8, D.BOOL).tolist() == [True, False, True]


def test_bitcast_narrow_types() -> None:
    i4 = torch.tensor([-1, -8, 7, 0], dtype=torch.int8)
    assert _bitcast(i4, D.INT4, D.UINT4).tolist() == [15, 8, 7, 0]
    u4 = torch.tensor([15, 8, 7, 1], dtype=torch.uint8)
    assert _bitcast(u4, D.UINT4, D.INT4).tolist() == [-1, -8, 7, 1]
    f4 = _bitcast(u4, D.UINT4, D.FLOAT4_E2M1)
    assert f4.dtype == torch.float32 and f4.tolist() == [-6.0, -0.0, 6.0, 0.5]
    assert _bitcast(f4, D.FLOAT4_E2M1, D.INT4).tolist() == [-1, -8, 7, 1]
    assert _bitcast(torch.tensor([3, 1], dtype=torch.uint8), D.UINT2, D.INT2).tolist() == [-1, 1]
    e8 = _bitcast(torch.tensor([127, 0, 255], dtype=torch.uint8), D.UINT8, D.FLOAT8_E8M0)
    assert e8[:2].tolist() == [1.0, 2.0**-127] and torch.isnan(e8[2])
    f8 = _bitcast(torch.tensor([0x38], dtype=torch.int8), D.INT8, D.FLOAT8_E4M3FN)
    assert f8.float().tolist() == [1.0]


# --- ONNX handlers -------------------------------------------------------------------------------------


def _model(op: str, inputs: list[tuple[str, int]], out: int, opset: int, **attrs: Any) -> onnx.ModelProto:
    node = helper.make_node(op, [n for n, _ in inputs], ["y"], **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, [3]) for n, t in inputs],
                          [helper.make_tensor_value_info("y", out, [3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_cast_opset1_names_the_type() -> None:
    m = _model("Cast", [("x", TensorProto.FLOAT)], TensorProto.INT32, 1, to="INT32")
    y = Interpreter(import_model(m)).run({"x": np.array([1.5, -2.5, 3], np.float32)})["y"]
    assert y.tolist() == [1, -2, 3]
    bad = _model("Cast", [("x", TensorProto.FLOAT)], TensorProto.INT32, 1, to="INT33")
    with pytest.raises(UnsupportedError, match="INT33"):
        import_model(bad)


def test_castlike_becomes_cast() -> None:
    f8 = TensorProto.FLOAT8E4M3FN
    m = _model("CastLike", [("x", TensorProto.FLOAT), ("t", f8)], f8, 19, saturate=0)
    g = import_model(m)
    assert [n.op for n in g.nodes] == ["Cast"] and g.nodes[0].attrs["saturate"] == 0
    t = np.zeros(3, ml_dtypes.float8_e4m3fn)
    y = Interpreter(g).run({"x": np.array([1000, 1, -1], np.float32), "t": t})["y"].astype(np.float32)
    assert np.isnan(y[0]) and y[1:].tolist() == [1, -1]


def test_cast_function_is_vectorized_for_large_inputs() -> None:
    x = torch.randn(1 << 16)
    y = cast(x, D.FLOAT32, D.FLOAT8_E8M0, 1, "nearest")
    assert y.shape == x.shape and y.dtype == torch.float32
