"""MatMul, Gemm, Einsum, Det, MatMulInteger and QLinearMatMul: inference (1-D operands, batch broadcasting,
symbolic dims), exact integer references, and the legacy Gemm handler."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.ir.ops.linalg import parse_einsum
from kiln.utils.errors import ShapeError, UnsupportedError

D = DType
F32 = D.FLOAT32
RNG = np.random.default_rng(0)


def _types(op: str, types: list[TensorType | None], **attrs: Any) -> TensorType:
    g = Graph()
    ins = [None if t is None else g.add_input(f"x{i}", t) for i, t in enumerate(types)]
    return g.add(op, ins, attrs)[0].type  # type: ignore[return-value]


def _run(op: str, xs: list[np.ndarray | None], **attrs: Any) -> np.ndarray:
    g = Graph()
    ins = [None if x is None else g.add_input(f"x{i}", TensorType(D.from_numpy(x.dtype), x.shape))
           for i, x in enumerate(xs)]
    g.outputs += g.add(op, ins, attrs)
    return Interpreter(g).run([x for x in xs if x is not None])[0]


def _t(*shape: Any, dtype: DType = F32) -> TensorType:
    return TensorType(dtype, tuple(shape))


# --- MatMul ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "out"), [
    ((3, 4), (4, 5), (3, 5)),
    ((4,), (4, 5), (5,)),
    ((3, 4), (4,), (3,)),
    ((4,), (4,), ()),
    ((2, 1, 3, 4), (5, 4, 6), (2, 5, 3, 6)),
    ((7, 3, 4), (4,), (7, 3)),
    (("B", "S", 8), (8, "H"), ("B", "S", "H")),
])
def test_matmul_shapes(a: tuple, b: tuple, out: tuple) -> None:
    assert _types("MatMul", [_t(*a), _t(*b)]) == _t(*out)
    if all(isinstance(d, int) for d in a + b):
        x, y = RNG.standard_normal(a).astype(np.float32), RNG.standard_normal(b).astype(np.float32)
        got = _run("MatMul", [x, y])
        assert got.shape == out
        np.testing.assert_allclose(got, np.matmul(x, y), rtol=1e-5, atol=1e-5)


def test_matmul_inference_errors_and_unknown_rank() -> None:
    assert _types("MatMul", [TensorType(F32, None), _t(4, 5)]) == TensorType(F32, None)
    with pytest.raises(ShapeError, match="inner dimensions"):
        _types("MatMul", [_t(3, 4), _t(5, 6)])
    with pytest.raises(ShapeError, match="scalar"):
        _types("MatMul", [_t(), _t(5, 6)])
    with pytest.raises(ShapeError, match="one dtype"):
        _types("MatMul", [_t(3, 4), _t(4, 2, dtype=D.FLOAT16)])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint64])
def test_integer_matmul_is_exact(dtype: type) -> None:
    info = np.iinfo(dtype)
    a = np.array([[info.max // 3, 2], [7, info.max // 5]], dtype=dtype)
    b = np.array([[3, 1], [5, 9]], dtype=dtype)
    with np.errstate(over="ignore"):
        want = np.matmul(a, b)  # wraps modulo 2**bits, as the kiln reference must
    got = _run("MatMul", [a, b])
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)


def test_half_matmul_keeps_dtype() -> None:
    a, b = RNG.standard_normal((2, 3, 8)).astype(np.float16), RNG.standard_normal((8, 4)).astype(np.float16)
    got = _run("MatMul", [a, b])
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), a.astype(np.float32) @ b.astype(np.float32), rtol=1e-2,
                               atol=1e-2)


# --- Gemm ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c_shape", [None, (), (1,), (5,), (3, 1), (3, 5)])
@pytest.mark.parametrize(("ta", "tb"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm(c_shape: tuple[int, ...] | None, ta: int, tb: int) -> None:
    a = RNG.standard_normal((4, 3) if ta else (3, 4)).astype(np.float32)
    b = RNG.standard_normal((5, 4) if tb else (4, 5)).astype(np.float32)
    c = None if c_shape is None else RNG.standard_normal(c_shape).astype(np.float32)
    got = _run("Gemm", [a, b, c], alpha=0.5, beta=2.0, transA=ta, transB=tb)
    want = 0.5 * ((a.T if ta else a) @ (b.T if tb else b)) + (0 if c is None else 2.0 * c)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gemm_inference() -> None:
    assert _types("Gemm", [_t("K", "M"), _t("K", 8), _t(8)], transA=1) == _t("M", 8)
    t = _types("Gemm", [TensorType(F32, None), _t(4, 8)])
    assert t.shape is not None and isinstance(t.shape[0], str) and t.shape[1] == 8
    with pytest.raises(ShapeError, match="broadcast"):
        _types("Gemm", [_t(3, 4), _t(4, 5), _t(4)])
    with pytest.raises(ShapeError, match="2-D"):
        _types("Gemm", [_t(2, 3, 4), _t(4, 5)])
    with pytest.raises(ShapeError, match="inner"):
        _types("Gemm", [_t(3, 4), _t(5, 6)])


def test_gemm_beta_zero_does_not_read_c_and_integer_gemm() -> None:
    a, b = np.eye(2, dtype=np.float32), np.ones((2, 2), np.float32)
    c = np.full((2, 2), np.nan, np.float32)
    np.testing.assert_array_equal(_run("Gemm", [a, b, c], beta=0.0), b)
    ai = np.array([[1, 2], [3, 4]], dtype=np.int64)
    np.testing.assert_array_equal(_run("Gemm", [ai, ai, np.array([10], np.int64)], alpha=2.0, beta=3.0),
                                  2 * ai @ ai + 30)


def _gemm_model(opset: int, **attrs: Any) -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], **attrs)
    f = TensorProto.FLOAT
    vis = [helper.make_tensor_value_info(n, f, s) for n, s in (("a", [3, 4]), ("b", [4, 5]), ("c", [5]))]
    g = helper.make_graph([node], "g", vis, [helper.make_tensor_value_info("y", f, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_gemm_legacy_broadcast_attribute() -> None:
    a, b, c = (RNG.standard_normal(s).astype(np.float32) for s in ((3, 4), (4, 5), (5,)))
    got = Interpreter(import_model(_gemm_model(6, broadcast=1, beta=0.5))).run([a, b, c])[0]
    np.testing.assert_allclose(got, a @ b + 0.5 * c, rtol=1e-5, atol=1e-6)
    with pytest.raises(UnsupportedError, match="broadcast"):
        import_model(_gemm_model(7, broadcast=1))
    m = _gemm_model(13, transA=0)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": a, "b": b, "c": c})[0]
    np.testing.assert_allclose(Interpreter(import_model(m)).run([a, b, c])[0], want, rtol=1e-5, atol=1e-6)


# --- Einsum ----------------------------------------------------------------------------------------------


def test_parse_einsum() -> None:
    assert parse_einsum("ij,jk", 2) == (["ij", "jk"], "ik")
    assert parse_einsum("...ij, ...jk", 2) == ([".ij", ".jk"], ".ik")
    assert parse_einsum("ii", 1) == (["ii"], "")
    assert parse_einsum("bA,Ab->", 2) == (["bA", "Ab"], "")
    assert parse_einsum("ba", 1) == (["ba"], "ab")
    for bad in ("ij,jk->iz", "i..j...", "ij->ii"):
        with pytest.raises(ValueError):
            parse_einsum(bad, bad.count(",") + 1)


@pytest.mark.parametrize(("eq", "shapes"), [
    ("ij,jk->ik", [(2, 3), (3, 4)]),
    ("bij,bjk->bik", [(2, 2, 3), (2, 3, 4)]),
    ("ii->i", [(3, 3)]),
    ("ii", [(3, 3)]),
    ("...ij,...jk", [(2, 1, 2, 3), (5, 3, 4)]),
    ("i,i", [(4,), (4,)]),
    ("ij->", [(2, 3)]),
    ("ji", [(2, 3)]),
    ("bi...,b...->b...", [(2, 3, 4), (2, 4)]),
])
def test_einsum_matches_numpy(eq: str, shapes: list[tuple[int, ...]]) -> None:
    xs = [RNG.standard_normal(s).astype(np.float32) for s in shapes]
    want = np.einsum(eq, *xs)
    assert _types("Einsum", [_t(*s) for s in shapes], equation=eq) == _t(*want.shape)
    np.testing.assert_allclose(_run("Einsum", xs, equation=eq), want, rtol=1e-5, atol=1e-5)


def test_einsum_symbolic_and_unknown() -> None:
    assert _types("Einsum", [_t("B", "S", 4), _t(4, "H")], equation="bsk,kh->bhs") == _t("B", "H", "S")
    unknown = TensorType(F32, None)
    assert _types("Einsum", [unknown, _t(4, 5)], equation="...k,kh->...h") == unknown
    t = _types("Einsum", [TensorType(F32, None), _t(4, 5)], equation="ik,kh->ih")
    assert t.shape is not None and t.shape[1] == 5 and isinstance(t.shape[0], str)
    with pytest.raises(ShapeError, match="rank"):
        _types("Einsum", [_t(2, 3, 4)], equation="ij->i")
    with pytest.raises(ShapeError, match="operands"):
        _types("Einsum", [_t(2, 3)], equation="ij,jk->ik")


def test_einsum_unsigned_and_half() -> None:
    a = np.array([[2**31, 3]], dtype=np.uint32)
    np.testing.assert_array_equal(_run("Einsum", [a, a], equation="ij,ij->i"),
                                  np.array([(2**62 + 9) % 2**32], dtype=np.uint32))
    h = RNG.standard_normal((2, 3)).astype(np.float16)
    got = _run("Einsum", [h], equation="ij->j")
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, h.astype(np.float32).sum(0), rtol=1e-3, atol=1e-3)


# --- Det -------------------------------------------------------------------------------------------------


def test_det() -> None:
    x = RNG.standard_normal((2, 3, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(_run("Det", [x]), np.linalg.det(x), rtol=1e-4, atol=1e-5)
    assert _run("Det", [x[0, 0].astype(np.float16)]).dtype == np.float16
    assert _types("Det", [_t("B", "M", "M")]) == _t("B")
    with pytest.raises(ShapeError):
        _types("Det", [_t(3, 4)])


# --- MatMulInteger, QLinearMatMul ------------------------------------------------------------------------


def test_matmulinteger_zero_points() -> None:
    a = RNG.integers(0, 256, (2, 3, 4)).astype(np.uint8)
    b = RNG.integers(-128, 128, (4, 5)).astype(np.int8)
    azp = np.array([3, 200, 17], dtype=np.uint8)  # per row of A
    bzp = RNG.integers(-5, 5, (5,)).astype(np.int8)  # per column of B
    got = _run("MatMulInteger", [a, b, azp, bzp])
    want = (a.astype(np.int64) - azp[:, None]) @ (b.astype(np.int64) - bzp)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_run("MatMulInteger", [a, b]), a.astype(np.int64) @ b.astype(np.int64))
    t = _types("MatMulInteger", [_t("N", 4, dtype=D.INT8), _t(4, 6, dtype=D.UINT8)])
    assert t == _t("N", 6, dtype=D.INT32)
    with pytest.raises(ShapeError):
        _types("MatMulInteger", [_t(2, 4), _t(4, 6, dtype=D.UINT8)])


def _qmm_numpy(a: np.ndarray, sa: np.ndarray, za: np.ndarray, b: np.ndarray, sb: np.ndarray, zb: np.ndarray,
               sy: np.ndarray, zy: np.ndarray) -> np.ndarray:
    acc = (a.astype(np.int64) - za) @ (b.astype(np.int64) - zb)
    y = np.rint(acc * (sa * sb / sy).astype(np.float64)) + zy
    info = np.iinfo(zy.dtype)
    return np.clip(y, info.min, info.max).astype(zy.dtype)


@pytest.mark.parametrize("out", [np.uint8, np.int8])
def test_qlinearmatmul(out: type) -> None:
    a = RNG.integers(0, 256, (2, 3, 4)).astype(np.uint8)
    b = RNG.integers(-128, 128, (4, 5)).astype(np.int8)
    sa, za = np.array(0.05, np.float32), np.array(120, np.uint8)
    sb, zb = np.array(0.02, np.float32), np.array(-3, np.int8)
    sy, zy = np.array(0.03, np.float32), np.array(10, out)
    args = [a, sa, za, b, sb, zb, sy, zy]
    got = _run("QLinearMatMul", args)
    assert got.dtype == out
    np.testing.assert_array_equal(got, _qmm_numpy(*args))


def test_qlinearmatmul_per_row_and_column() -> None:
    a = RNG.integers(0, 256, (3, 4)).astype(np.uint8)
    b = RNG.integers(0, 256, (4, 2)).astype(np.uint8)
    sa, za = np.array([0.1, 0.2, 0.05], np.float32), np.array([1, 2, 3], np.uint8)
    sb, zb = np.array([0.01, 0.02], np.float32), np.array([4, 5], np.uint8)
    sy, zy = np.array(0.5, np.float32), np.array(7, np.uint8)
    got = _run("QLinearMatMul", [a, sa, za, b, sb, zb, sy, zy])
    acc = (a.astype(np.int64) - za[:, None]) @ (b.astype(np.int64) - zb)
    want = np.clip(np.rint(acc * (sa[:, None] * sb / sy).astype(np.float64)) + 7, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    t = _types("QLinearMatMul", [_t("M", 4, dtype=D.UINT8), _t(), _t(dtype=D.UINT8), _t(4, 2, dtype=D.INT8),
                                 _t(), _t(dtype=D.INT8), _t(), _t(dtype=D.INT8)])
    assert t == _t("M", 2, dtype=D.INT8)


def test_qlinearmatmul_float8() -> None:
    a = torch.tensor([[1.0, 2.0], [0.5, -1.0]]).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    zero = torch.tensor(0.0).to(torch.float8_e4m3fn)
    g = Graph()
    f8 = D.FLOAT8_E4M3FN
    types = [(f8, (2, 2)), (F32, ()), (f8, ())] * 2 + [(F32, ()), (f8, ())]
    ins = [g.add_input(f"x{i}", TensorType(dt, s)) for i, (dt, s) in enumerate(types)]
    g.outputs += g.add("QLinearMatMul", ins)
    (y,) = Interpreter(g).run([a, one, zero, a, one, zero, torch.tensor(0.001), zero])
    assert y.dtype == torch.float8_e4m3fn
    # a @ a = [[2, 0], [0, 2]]; 2 / 0.001 saturates to e4m3fn's largest finite value.
    torch.testing.assert_close(y.float(), torch.tensor([[448.0, 0.0], [0.0, 448.0]]))
