"""Elementwise op entries: inference (symbolic dims, unknown rank, dtype checks), references on dtypes torch
lacks kernels for, edge semantics the ONNX suite does not cover, and the legacy ONNX handlers."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ExecutionError, ShapeError, UnsupportedError

D = DType
UINTS = [np.uint16, np.uint32, np.uint64]


def _graph(op: str, types: list[TensorType | None], attrs: dict[str, Any] | None = None,
           n_out: int = 1) -> tuple[Graph, list[Any]]:
    g = Graph()
    ins = [None if t is None else g.add_input(f"x{i}", t) for i, t in enumerate(types)]
    outs = g.add(op, ins, attrs or {}, outputs=n_out)
    g.outputs += outs
    return g, outs


def _run(op: str, *xs: np.ndarray, **attrs: Any) -> np.ndarray:
    types = [TensorType(D.from_numpy(x.dtype), x.shape) for x in xs]
    g, _ = _graph(op, list(types), attrs)
    return Interpreter(g).run([np.asarray(x) for x in xs])[0]


def _onnx(op: str, inputs: list[tuple[str, int, list[Any] | None]], out_type: int, opset: int,
          inits: list[onnx.TensorProto] | None = None, **attrs: Any) -> onnx.ModelProto:
    node = helper.make_node(op, [n for n, _, _ in inputs], ["y"], **attrs)
    init_names = {t.name for t in inits or []}
    vis = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs if n not in init_names]
    g = helper.make_graph([node], "g", vis, [helper.make_tensor_value_info("y", out_type, None)],
                          initializer=inits or [])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


# --- inference ---------------------------------------------------------------------------------------


def test_broadcast_symbolic_dims() -> None:
    _, (y,) = _graph("Add", [TensorType(D.FLOAT32, ("N", 1, 4)), TensorType(D.FLOAT32, ("M", 1))])
    assert y.type == TensorType(D.FLOAT32, ("N", "M", 4))
    _, (y,) = _graph("Max", [TensorType(D.INT8, ("N", 3)), TensorType(D.INT8, (3,)), TensorType(D.INT8, ())])
    assert y.type == TensorType(D.INT8, ("N", 3))


def test_unknown_rank_gives_unknown_shape() -> None:
    _, (y,) = _graph("Mul", [TensorType(D.FLOAT32, None), TensorType(D.FLOAT32, (2, 3))])
    assert y.type == TensorType(D.FLOAT32, None)
    strings = TensorType(D.STRING, (2,))
    _, (y,) = _graph("Where", [TensorType(D.BOOL, None), strings, strings])
    assert y.type == TensorType(D.STRING, None)
    _, (y,) = _graph("Clip", [TensorType(D.FLOAT16, None), None, TensorType(D.FLOAT16, ())])
    assert y.type == TensorType(D.FLOAT16, None)


def test_comparison_and_predicate_outputs_are_bool() -> None:
    for op in ("Equal", "Less", "GreaterOrEqual"):
        _, (y,) = _graph(op, [TensorType(D.UINT64, ("B",)), TensorType(D.UINT64, (1,))])
        assert y.type == TensorType(D.BOOL, ("B",))
    _, (y,) = _graph("IsInf", [TensorType(D.FLOAT8_E5M2, (2,))])
    assert y.type == TensorType(D.BOOL, (2,))


def test_pow_output_has_base_dtype() -> None:
    _, (y,) = _graph("Pow", [TensorType(D.INT32, ("N",)), TensorType(D.FLOAT32, (1,))])
    assert y.type == TensorType(D.INT32, ("N",))


@pytest.mark.parametrize("op, types, match", [
    ("Add", [D.FLOAT32, D.FLOAT16], "one dtype"),
    ("Sqrt", [D.INT32], "Sqrt takes"),
    ("Neg", [D.UINT8], "Neg takes"),
    ("And", [D.INT8, D.INT8], "And takes"),
    ("BitwiseAnd", [D.FLOAT32, D.FLOAT32], "BitwiseAnd takes"),
    ("Where", [D.INT8, D.FLOAT32, D.FLOAT32], "input 0 has dtype int8"),
    ("Pow", [D.UINT8, D.UINT8], "input 0 has dtype uint8"),
])
def test_dtype_checks_name_the_node(op: str, types: list[DType], match: str) -> None:
    with pytest.raises(ShapeError, match=match) as e:
        _graph(op, [TensorType(t, (2,)) for t in types], {"direction": "LEFT"} if op == "BitShift" else None)
    assert f"({op})" in str(e.value)


def test_static_broadcast_mismatch_raises() -> None:
    with pytest.raises(ShapeError, match="cannot broadcast"):
        _graph("Sub", [TensorType(D.FLOAT32, (2, 3)), TensorType(D.FLOAT32, (4,))])


def test_clip_bounds_must_be_scalars() -> None:
    with pytest.raises(ShapeError, match="min must be a scalar"):
        _graph("Clip", [TensorType(D.FLOAT32, (4,)), TensorType(D.FLOAT32, (2,))])
    _, (y,) = _graph("Clip", [TensorType(D.FLOAT32, ()), TensorType(D.FLOAT32, (1,))])
    assert y.type == TensorType(D.FLOAT32, ())  # a one-element bound does not change the rank


def test_prelu_slope_broadcasts_one_way() -> None:
    _, (y,) = _graph("PRelu", [TensorType(D.FLOAT32, ("N", 3, 5)), TensorType(D.FLOAT32, (3, 1))])
    assert y.type == TensorType(D.FLOAT32, ("N", 3, 5))
    with pytest.raises(ShapeError, match="does not broadcast to X"):
        _graph("PRelu", [TensorType(D.FLOAT32, (1, 3)), TensorType(D.FLOAT32, (2, 3))])


def test_swiglu_needs_one_shape() -> None:
    _, (y,) = _graph("SwiGLU", [TensorType(D.FLOAT32, ("N", 8)), TensorType(D.FLOAT32, (4, "K"))])
    assert y.type == TensorType(D.FLOAT32, (4, 8))
    with pytest.raises(ShapeError, match="SwiGLU does not broadcast"):
        _graph("SwiGLU", [TensorType(D.FLOAT32, (2, 8)), TensorType(D.FLOAT32, (1, 8))])


@pytest.mark.parametrize("op, attrs", [
    ("Gelu", {"approximate": "erf"}),
    ("Mod", {"fmod": 2}),
    ("BitShift", {}),
    ("Relu", {"alpha": 1.0}),
])
def test_attribute_validation(op: str, attrs: dict[str, Any]) -> None:
    dt = D.INT32 if op in ("Mod", "BitShift") else D.FLOAT32
    with pytest.raises(UnsupportedError):
        _graph(op, [TensorType(dt, (2,))] * (2 if op in ("Mod", "BitShift") else 1), attrs)


# --- references on unsigned types torch has no kernels for ----------------------------------------------


def _uints(dt: Any, n: int = 257, nonzero: bool = False) -> np.ndarray:
    info = np.iinfo(dt)
    v = np.random.default_rng(0).integers(0, info.max, n, dtype=dt, endpoint=True)
    v[:6] = [0, 1, info.max, info.max - 1, info.max // 2, info.max // 2 + 1]
    if nonzero:
        v[v == 0] = 7
    return v


@pytest.mark.parametrize("dt", UINTS)
def test_unsigned_arithmetic_matches_numpy(dt: Any) -> None:
    a, b = _uints(dt), _uints(dt, nonzero=True)[::-1].copy()
    for op, ref in [("Add", np.add), ("Sub", np.subtract), ("Mul", np.multiply), ("Div", np.floor_divide),
                    ("Max", np.maximum), ("Min", np.minimum), ("BitwiseXor", np.bitwise_xor)]:
        np.testing.assert_array_equal(_run(op, a, b), ref(a, b), err_msg=op)
    for fmod in (0, 1):
        np.testing.assert_array_equal(_run("Mod", a, b, fmod=fmod), np.remainder(a, b))
    for op, ref in [("Greater", np.greater), ("LessOrEqual", np.less_equal), ("Equal", np.equal)]:
        np.testing.assert_array_equal(_run(op, a, b), ref(a, b), err_msg=op)
    np.testing.assert_array_equal(_run("Sign", a), (a != 0).astype(dt))
    np.testing.assert_array_equal(_run("BitwiseNot", a), np.invert(a))
    lo, hi = np.array(dt(5)), np.array(a[4])
    np.testing.assert_array_equal(_run("Clip", a, lo, hi), np.clip(a, lo, hi))


@pytest.mark.parametrize("dt", [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int32, np.int64])
def test_bitshift_past_the_width_and_negative(dt: Any) -> None:
    bits = np.dtype(dt).itemsize * 8
    info = np.iinfo(dt)
    x = np.array([1, 3, info.max, info.min if info.min else info.max // 2 + 1, 5, 6], dtype=dt)
    s = np.array([0, 1, bits - 1, bits - 1, bits, bits + 3], dtype=dt)
    left, right = _run("BitShift", x, s, direction="LEFT"), _run("BitShift", x, s, direction="RIGHT")
    wide = [int(v) for v in x]
    for i, (v, k) in enumerate(zip(wide, s.tolist())):
        want_l = 0 if k >= bits else (v << k) % (1 << bits)
        want_l = want_l - (1 << bits) if info.min and want_l >= 1 << (bits - 1) else want_l
        want_r = (v >> min(k, bits - 1)) if info.min else (0 if k >= bits else v >> k)
        assert (int(left[i]), int(right[i])) == (want_l, want_r), (v, k)
    if info.min:  # signed: a negative shift gives the sign fill
        neg = _run("BitShift", np.array([-8, 8], dtype=dt), np.array([-1, -1], dtype=dt), direction="RIGHT")
        assert neg.tolist() == [-1, 0]


def test_integer_division_by_zero_is_an_error() -> None:
    for op in ("Div", "Mod"):
        with pytest.raises(ExecutionError, match="division by zero"):
            _run(op, np.array([1, 2], np.int32), np.array([1, 0], np.int32))


def test_integer_division_truncates_and_mod_follows_the_divisor() -> None:
    a, b = np.array([-7, 7, -7, 7], np.int16), np.array([2, -2, -2, 2], np.int16)
    assert _run("Div", a, b).tolist() == [-3, -3, 3, 3]
    assert _run("Mod", a, b).tolist() == [1, -1, -1, 1]
    assert _run("Mod", a, b, fmod=1).tolist() == [-1, 1, -1, 1]


def test_float_mod_edge_cases() -> None:
    x = np.array([0.0, -0.0, -1.0, 1.0, np.inf, 1.0, 5.5], np.float32)
    y = np.array([-2.0, 2.0, np.inf, -np.inf, 2.0, 0.0, -2.0], np.float32)
    z = _run("Mod", x, y)
    assert np.signbit(z[:2]).tolist() == [True, False]
    assert z[2:4].tolist() == [np.inf, -np.inf]
    assert np.isnan(z[4:6]).all()
    assert z[6] == -0.5


def test_pow_mixed_dtypes() -> None:
    base, exponent = np.array([2, -2, 1, -1, 3], np.int64), np.array([3, 3, -2, -3, -1], np.int64)
    assert _run("Pow", base, exponent).tolist() == [8, -8, 1, -1, 0]
    np.testing.assert_allclose(_run("Pow", np.array([2.0, 4.0], np.float16), np.array([3, -1], np.int8)),
                               [8.0, 0.25])
    assert _run("Pow", np.array([2, 9], np.int32), np.array([0.5, 0.5], np.float32)).tolist() == [1, 3]


def test_sign_abs_and_neg_edges() -> None:
    s = _run("Sign", np.array([np.nan, -0.0, -3.0, 2.0], np.float32))
    assert np.isnan(s[0]) and s[1:].tolist() == [0.0, -1.0, 1.0]
    assert _run("Abs", np.array([-128, -3], np.int8)).tolist() == [-128, 3]  # wraps like C
    assert _run("Neg", np.array([-128, 5], np.int8)).tolist() == [-128, -5]


def test_shrink_on_integers_truncates_the_real_result() -> None:
    x = np.array([-5, -3, -2, 0, 2, 3, 5], np.int32)
    assert _run("Shrink", x, lambd=2.5, bias=1.5).tolist() == [-3, -1, 0, 0, 0, 1, 3]
    u = np.array([0, 2, 3, 2**64 - 1], np.uint64)
    assert _run("Shrink", u, lambd=2.5, bias=1.5).tolist() == [0, 0, 1, 2**64 - 3]


def test_isinf_flags_and_float8() -> None:
    x = np.array([np.inf, -np.inf, 1.0, np.nan], np.float32)
    assert _run("IsInf", x, detect_negative=0).tolist() == [True, False, False, False]
    assert _run("IsInf", x, detect_positive=0).tolist() == [False, True, False, False]
    g, _ = _graph("IsNaN", [TensorType(D.FLOAT8_E4M3FN, (2,))])
    out = Interpreter(g).run([torch.tensor([float("nan"), 1.0]).to(torch.float8_e4m3fn)])[0]
    assert out.tolist() == [True, False]


def test_strings_compare_and_select() -> None:
    a, b = np.array(["x", "y", "z"], dtype=object), np.array(["y"], dtype=object)
    assert _run("Equal", a, b).tolist() == [False, True, False]
    w = _run("Where", np.array([True, False, True]), a, b)
    assert w.dtype == object and w.tolist() == ["x", "y", "z"]


def test_clip_min_above_max_gives_max() -> None:
    out = _run("Clip", np.array([-5, 0, 5], np.int8), np.array(3, np.int8), np.array(1, np.int8))
    assert out.tolist() == [1, 1, 1]


def test_half_precision_activations_round_once() -> None:
    x = np.linspace(-3, 3, 301).astype(np.float16)
    y = _run("Gelu", x, approximate="none")
    exact = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    np.testing.assert_array_equal(y, exact.astype(np.float32).astype(np.float16))


# --- legacy ONNX versions -------------------------------------------------------------------------------


def _import_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return Interpreter(import_model(model)).run(feeds)["y"]


def test_legacy_broadcast_axis_with_computed_and_constant_b() -> None:
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.array([10, 20, 30], np.float32)
    computed = _onnx("Add", [("a", TensorProto.FLOAT, [2, 3, 4]), ("b", TensorProto.FLOAT, [3])],
                     TensorProto.FLOAT, 6, broadcast=1, axis=1)
    np.testing.assert_array_equal(_import_run(computed, {"a": a, "b": b}), a + b[:, None])
    init = helper.make_tensor("b", TensorProto.FLOAT, [3], b)
    const = _onnx("Sub", [("a", TensorProto.FLOAT, [2, 3, 4]), ("b", TensorProto.FLOAT, [3])],
                  TensorProto.FLOAT, 1, inits=[init], broadcast=1, axis=-2, consumed_inputs=[0, 0])
    np.testing.assert_array_equal(_import_run(const, {"a": a}), a - b[:, None])


def test_legacy_broadcast_attribute_rejected_from_opset_7() -> None:
    m = _onnx("Mul", [("a", TensorProto.FLOAT, [2]), ("b", TensorProto.FLOAT, [2])], TensorProto.FLOAT, 7,
              broadcast=1)
    with pytest.raises(UnsupportedError, match="broadcast"):
        import_model(m)


def test_legacy_prelu_slope_runs_along_channels() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    slope = np.array([0.1, 0.2, 0.3], np.float32)
    m = _onnx("PRelu", [("x", TensorProto.FLOAT, [2, 3, 4, 5]), ("s", TensorProto.FLOAT, [3])],
              TensorProto.FLOAT, 6)
    want = np.where(x < 0, x * slope[:, None, None], x)
    np.testing.assert_allclose(_import_run(m, {"x": x, "s": slope}), want, rtol=1e-6)


def test_legacy_clip_attributes() -> None:
    x = np.array([-3, -0.5, 0.5, 3], np.float16)
    m = _onnx("Clip", [("x", TensorProto.FLOAT16, [4])], TensorProto.FLOAT16, 6, min=-1.0, max=1.0)
    assert _import_run(m, {"x": x}).tolist() == [-1, -0.5, 0.5, 1]
    only_max = _onnx("Clip", [("x", TensorProto.FLOAT16, [4])], TensorProto.FLOAT16, 1, max=0.0)
    assert _import_run(only_max, {"x": x}).tolist() == [-3, -0.5, 0, 0]


def test_legacy_variadic_and_consumed_inputs() -> None:
    x = np.array([1.0, -2.0], np.float32)
    m = _onnx("Sum", [("a", TensorProto.FLOAT, [2]), ("b", TensorProto.FLOAT, [2])], TensorProto.FLOAT, 6)
    assert _import_run(m, {"a": x, "b": x}).tolist() == [2.0, -4.0]
    r = _onnx("Relu", [("a", TensorProto.FLOAT, [2])], TensorProto.FLOAT, 1, consumed_inputs=[0])
    assert _import_run(r, {"a": x}).tolist() == [1.0, 0.0]


def test_legacy_prelu_slope_must_match_the_channels() -> None:
    f = TensorProto.FLOAT
    m = _onnx("PRelu", [("x", f, [2, 3, 4]), ("s", f, [4])], f, 6)
    with pytest.raises(UnsupportedError, match="does not match the 3 channels"):
        import_model(m)
