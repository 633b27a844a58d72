"""Reduce* op entries: inference (symbolic dims, unknown rank, run-time axes), references across dtypes and
empty sets, noop_with_empty_axes, and the legacy ONNX handlers (axes as an attribute)."""

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
from kiln.utils.errors import ShapeError, UnsupportedError

D = DType
ALL_REDUCE = ["ReduceSum", "ReduceMean", "ReduceProd", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
              "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"]


def _types(op: str, x: TensorType, axes: list[int] | TensorType | None = None, **attrs: Any) -> TensorType:
    g = Graph()
    v = g.add_input("x", x)
    a = None
    if isinstance(axes, list):
        a = g.add_initializer("axes", torch.tensor(axes, dtype=torch.int64))
    elif isinstance(axes, TensorType):
        a = g.add_input("axes", axes)
    return g.add(op, [v, a], attrs)[0].type  # type: ignore[return-value]


def _run(op: str, x: np.ndarray, axes: list[int] | None = None, **attrs: Any) -> np.ndarray:
    g = Graph()
    v = g.add_input("x", TensorType(D.from_numpy(x.dtype), x.shape))
    a = None if axes is None else g.add_initializer("axes", torch.tensor(axes, dtype=torch.int64))
    g.outputs += g.add(op, [v, a], attrs)
    return Interpreter(g).run([x])[0]


def _numpy(op: str, x: np.ndarray, axes: tuple[int, ...] | None, keep: bool) -> np.ndarray:
    f = x.astype(np.float64)
    fns = {
        "ReduceSum": lambda: np.sum(f, axes, keepdims=keep),
        "ReduceMean": lambda: np.mean(f, axes, keepdims=keep),
        "ReduceProd": lambda: np.prod(f, axes, keepdims=keep),
        "ReduceMax": lambda: np.max(f, axes, keepdims=keep),
        "ReduceMin": lambda: np.min(f, axes, keepdims=keep),
        "ReduceL1": lambda: np.sum(np.abs(f), axes, keepdims=keep),
        "ReduceL2": lambda: np.sqrt(np.sum(f * f, axes, keepdims=keep)),
        "ReduceSumSquare": lambda: np.sum(f * f, axes, keepdims=keep),
        "ReduceLogSum": lambda: np.log(np.sum(f, axes, keepdims=keep)),
        "ReduceLogSumExp": lambda: np.log(np.sum(np.exp(f), axes, keepdims=keep)),
    }
    return fns[op]()


# --- inference -------------------------------------------------------------------------------------------


def test_static_axes_keep_and_drop_symbolic_dims() -> None:
    x = TensorType(D.FLOAT32, ("N", 3, "S", 5))
    assert _types("ReduceSum", x, [1, -1]) == TensorType(D.FLOAT32, ("N", 1, "S", 1))
    assert _types("ReduceMax", x, [1, -1], keepdims=0) == TensorType(D.FLOAT32, ("N", "S"))
    assert _types("ReduceMean", x) == TensorType(D.FLOAT32, (1, 1, 1, 1))
    assert _types("ReduceL2", x, keepdims=0) == TensorType(D.FLOAT32, ())


def test_noop_with_empty_axes_keeps_shape() -> None:
    x = TensorType(D.FLOAT32, ("N", 3))
    assert _types("ReduceSum", x, [], noop_with_empty_axes=1) == x
    assert _types("ReduceSum", x, None, noop_with_empty_axes=1, keepdims=0) == x
    assert _types("ReduceSum", x, [], keepdims=0) == TensorType(D.FLOAT32, ())


def test_unknown_rank() -> None:
    x = TensorType(D.FLOAT32, None)
    assert _types("ReduceSum", x, [0]) == TensorType(D.FLOAT32, None)
    assert _types("ReduceSum", x) == TensorType(D.FLOAT32, None)
    assert _types("ReduceSum", x, keepdims=0) == TensorType(D.FLOAT32, ())  # every axis, dropped


def test_runtime_axes() -> None:
    x = TensorType(D.FLOAT32, ("N", 1, 4))
    t = _types("ReduceSum", x, TensorType(D.INT64, (2,)))
    assert t.shape is not None and len(t.shape) == 3 and t.shape[1] == 1
    assert all(isinstance(d, str) for d in (t.shape[0], t.shape[2]))
    t = _types("ReduceSum", x, TensorType(D.INT64, (2,)), keepdims=0)
    assert t.shape is not None and len(t.shape) == 1
    assert _types("ReduceSum", x, TensorType(D.INT64, ("k",)), keepdims=0).shape is None
    assert _types("ReduceSum", x, TensorType(D.INT64, (0,)), keepdims=0).shape == ()


def test_runtime_axes_execute() -> None:
    g = Graph()
    v = g.add_input("x", TensorType(D.FLOAT32, ("N", 4)))
    a = g.add_input("axes", TensorType(D.INT64, (1,)))
    g.outputs += g.add("ReduceSum", [v, a], {"keepdims": 0})
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(Interpreter(g).run([x, np.array([1])])[0], x.sum(1))


@pytest.mark.parametrize(("axes", "msg"), [([0, -2], "twice"), ([2], "out of range")])
def test_bad_axes(axes: list[int], msg: str) -> None:
    with pytest.raises(ShapeError, match=msg):
        _types("ReduceSum", TensorType(D.FLOAT32, (2, 3)), axes)


def test_dtype_checks() -> None:
    assert _types("ReduceMax", TensorType(D.BOOL, (2, 3)), [1]) == TensorType(D.BOOL, (2, 1))
    with pytest.raises(ShapeError, match="does not accept"):
        _types("ReduceSum", TensorType(D.BOOL, (2, 3)))
    with pytest.raises(ShapeError, match="int64"):
        _types("ReduceSum", TensorType(D.FLOAT32, (2, 3)), TensorType(D.INT32, (1,)))


# --- reference -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ALL_REDUCE)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_floats_match_numpy(op: str, dtype: type) -> None:
    x = np.random.default_rng(0).uniform(0.5, 1.5, (2, 3, 4)).astype(dtype)
    for axes, keep in (([1], 1), ([0, -1], 0), (None, 1)):
        got = _run(op, x, axes, keepdims=keep)
        want = _numpy(op, x, None if axes is None else tuple(axes), bool(keep))
        assert got.dtype == dtype and got.shape == want.shape
        tol = 2e-3 if dtype == np.float16 else 1e-5
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint64, np.int8, np.uint8])
def test_integer_max_min_sum_exact(dtype: type) -> None:
    info = np.iinfo(dtype)
    x = np.array([[info.max, info.min, 3], [info.max - 1, 7, info.min + 1]], dtype=dtype)
    for op, fn in (("ReduceMax", np.max), ("ReduceMin", np.min)):
        np.testing.assert_array_equal(_run(op, x, [1], keepdims=0), fn(x, 1))
    if dtype in (np.int32, np.int64, np.uint32, np.uint64):
        y = np.array([[5, 6, 7]], dtype=dtype)
        np.testing.assert_array_equal(_run("ReduceSum", y, [1]), y.sum(1, keepdims=True, dtype=dtype))


def test_uint64_sum_wraps_like_uint64() -> None:
    x = np.array([2**64 - 1, 5], dtype=np.uint64)
    np.testing.assert_array_equal(_run("ReduceSum", x, keepdims=0), np.array(4, dtype=np.uint64))


def test_integer_mean_truncates_and_l2_on_ints() -> None:
    x = np.array([[1, 2], [-3, -4]], dtype=np.int32)
    np.testing.assert_array_equal(_run("ReduceMean", x, [1], keepdims=0), np.array([1, -3], dtype=np.int32))
    np.testing.assert_array_equal(_run("ReduceL2", np.array([3, 4], dtype=np.int64), keepdims=0), np.int64(5))


def test_bool_max_min() -> None:
    x = np.array([[True, False], [False, False]])
    np.testing.assert_array_equal(_run("ReduceMax", x, [1], keepdims=0), [True, False])
    np.testing.assert_array_equal(_run("ReduceMin", x, [0], keepdims=0), [False, False])


@pytest.mark.parametrize(("op", "value"), [
    ("ReduceSum", 0.0), ("ReduceProd", 1.0), ("ReduceMax", -np.inf), ("ReduceMin", np.inf), ("ReduceL1", 0.0),
    ("ReduceL2", 0.0), ("ReduceSumSquare", 0.0), ("ReduceLogSum", -np.inf), ("ReduceLogSumExp", -np.inf),
])
def test_empty_set_gives_identity(op: str, value: float) -> None:
    got = _run(op, np.zeros((2, 0, 4), dtype=np.float32), [1])
    assert got.shape == (2, 1, 4)
    np.testing.assert_array_equal(got, np.full((2, 1, 4), value, dtype=np.float32))


def test_empty_set_integer_max_min() -> None:
    x = np.zeros((0, 3), dtype=np.int32)
    np.testing.assert_array_equal(_run("ReduceMax", x, [0], keepdims=0), np.full(3, np.iinfo(np.int32).min))
    np.testing.assert_array_equal(_run("ReduceMin", np.zeros((0,), np.uint64), keepdims=0),
                                  np.array(np.iinfo(np.uint64).max, dtype=np.uint64))
    assert np.isnan(_run("ReduceMean", np.zeros((0,), np.float32), keepdims=0))


def test_noop_applies_only_the_elementwise_steps() -> None:
    x = np.array([[-2.0, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(_run("ReduceSum", x, [], noop_with_empty_axes=1), x)
    np.testing.assert_array_equal(_run("ReduceL2", x, [], noop_with_empty_axes=1), np.abs(x))
    np.testing.assert_array_equal(_run("ReduceSumSquare", x, None, noop_with_empty_axes=1), x * x)
    np.testing.assert_array_equal(_run("ReduceLogSumExp", x, [], noop_with_empty_axes=1), x)


def test_rank0_input() -> None:
    x = np.array(2.5, dtype=np.float32)
    assert _run("ReduceSum", x, keepdims=1) == 2.5
    assert _run("ReduceMax", x, keepdims=0).shape == ()


def test_logsumexp_is_stable() -> None:
    x = np.array([1000.0, 1000.0], dtype=np.float32)
    np.testing.assert_allclose(_run("ReduceLogSumExp", x, keepdims=0), 1000 + np.log(2), rtol=1e-6)


# --- ONNX handlers ---------------------------------------------------------------------------------------


def _model(op: str, opset: int, x: np.ndarray, axes_input: list[int] | None = None,
           **attrs: Any) -> onnx.ModelProto:
    inputs = ["x"] + (["axes"] if axes_input is not None else [])
    node = helper.make_node(op, inputs, ["y"], **attrs)
    inits = [] if axes_input is None else [helper.make_tensor("axes", TensorProto.INT64, [len(axes_input)],
                                                              axes_input)]
    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, x.shape)],
                          [helper.make_tensor_value_info("y", elem, None)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _compare_ort(m: onnx.ModelProto, x: np.ndarray) -> None:
    got = Interpreter(import_model(m)).run([x])[0]
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("op", "opset"), [("ReduceSum", 11), ("ReduceMean", 13), ("ReduceLogSumExp", 11),
                                           ("ReduceSumSquare", 13), ("ReduceProd", 1)])
def test_legacy_axes_attribute(op: str, opset: int) -> None:
    x = np.random.default_rng(1).uniform(0.5, 1.5, (2, 3, 4)).astype(np.float32)
    _compare_ort(_model(op, opset, x, axes=[0, 2], keepdims=0), x)
    _compare_ort(_model(op, opset, x), x)


@pytest.mark.parametrize(("op", "opset"), [("ReduceSum", 13), ("ReduceMax", 18), ("ReduceL1", 18)])
def test_axes_input(op: str, opset: int) -> None:
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 4)).astype(np.float32)
    _compare_ort(_model(op, opset, x, [-1], keepdims=0), x)
    _compare_ort(_model(op, opset, x, [], noop_with_empty_axes=1), x)


def test_legacy_unknown_attribute_raises() -> None:
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(UnsupportedError, match="noop_with_empty_axes"):
        import_model(_model("ReduceSum", 11, x, noop_with_empty_axes=1))
    with pytest.raises(UnsupportedError, match="axes"):
        import_model(_model("ReduceMean", 18, x, axes=[1]))
