"""Random generators: types, seeding, ranges and degenerate distributions (ONNX defines no values)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ShapeError, UnsupportedError

F = DType.FLOAT32


def _run(g: Graph, feeds: dict | None = None) -> dict:
    return Interpreter(g).run(feeds or {})


def test_uniform_and_normal_shapes_ranges_and_seeds() -> None:
    g = Graph()
    uniform = {"shape": (1000,), "low": -2.0, "high": 3.0, "seed": 7.0}
    (u,) = g.add("RandomUniform", [], uniform, outputs=["u"])
    (n,) = g.add("RandomNormal", [], {"shape": (4000,), "mean": 5.0, "scale": 0.5, "dtype": DType.FLOAT64},
                 outputs=["n"])
    assert u.type == TensorType(F, (1000,)) and n.type == TensorType(DType.FLOAT64, (4000,))
    g.outputs = [u, n]
    a, b = _run(g), _run(g)
    assert a["u"].min() >= -2 and a["u"].max() < 3 and abs(a["u"].mean() - 0.5) < 0.3
    assert abs(a["n"].mean() - 5) < 0.05 and abs(a["n"].std() - 0.5) < 0.05
    np.testing.assert_array_equal(a["u"], b["u"])  # seeded: the same values every run


def test_like_ops_follow_the_input() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT16, ("N", 3)))
    (u,) = g.add("RandomUniformLike", [x], outputs=["u"])
    (n,) = g.add("RandomNormalLike", [x], {"dtype": DType.BFLOAT16}, outputs=["n"])
    assert u.type == TensorType(DType.FLOAT16, ("N", 3)) and n.type == TensorType(DType.BFLOAT16, ("N", 3))
    g.outputs = [u, n]
    out = _run(g, {"x": np.zeros((2, 3), np.float16)})
    assert out["u"].shape == (2, 3) and out["u"].dtype == np.float16
    i = g.add_input("i", TensorType(DType.INT32, (2,)))
    with pytest.raises(ShapeError, match="cannot draw int32 values"):
        g.add("RandomUniformLike", [i], outputs=1)


def test_multinomial() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F, ("B", 3)))
    (y,) = g.add("Multinomial", [x], {"sample_size": 5, "dtype": DType.INT64}, outputs=["y"])
    assert y.type == TensorType(DType.INT64, ("B", 5))
    g.outputs = [y]
    logits = np.array([[0, 50, 0], [-50, -50, 0]], np.float32)  # softmax puts all mass on one class
    assert _run(g, {"x": logits})["y"].tolist() == [[1] * 5, [2] * 5]
    with pytest.raises(ShapeError, match="sample_size must be positive"):
        g.add("Multinomial", [x], {"sample_size": 0}, outputs=1)
    with pytest.raises(UnsupportedError, match="dtype"):
        g.add("Multinomial", [x], {"dtype": F}, outputs=1)


def test_bernoulli_degenerate_probabilities_and_dtype() -> None:
    node = helper.make_node("Bernoulli", ["p"], ["y"], dtype=TensorProto.BOOL)
    graph = helper.make_graph([node], "m", [helper.make_tensor_value_info("p", TensorProto.DOUBLE, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.BOOL, [4])])
    g = import_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)]))
    assert g.outputs[0].type == TensorType(DType.BOOL, (4,))
    out = Interpreter(g).run({"p": np.array([0, 1, 1, 0], np.float64)})
    assert out["y"].tolist() == [False, True, True, False]


def test_random_shape_must_be_non_negative() -> None:
    with pytest.raises(ShapeError, match="negative dim"):
        Graph().add("RandomNormal", [], {"shape": (2, -1)}, outputs=1)
