from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import InputError


def _model() -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, ("N", 3)))
    y = g.add_input("y", TensorType(DType.FLOAT32, ("N", 3)))
    (s,) = g.add("Add", [x, y], outputs=["sum"])
    (r,) = g.add("Relu", [s], outputs=["out"])
    g.outputs += [r, s]
    return g


def test_numpy_in_numpy_out() -> None:
    x = np.array([[1, -2, 3]], np.float32)
    out = Interpreter(_model()).run({"x": x, "y": x})
    assert isinstance(out["out"], np.ndarray)
    np.testing.assert_array_equal(out["out"], [[2, 0, 6]])
    np.testing.assert_array_equal(out["sum"], [[2, -4, 6]])


def test_torch_in_torch_out_and_list_feeds() -> None:
    x = torch.tensor([[1.0, -2.0, 3.0]])
    out = Interpreter(_model()).run([x, x])
    assert isinstance(out, list) and isinstance(out[0], torch.Tensor)
    assert out[0].tolist() == [[2.0, 0.0, 6.0]]


def test_select_outputs() -> None:
    x = np.ones((2, 3), np.float32)
    out = Interpreter(_model()).run({"x": x, "y": x}, outputs=["sum"])
    assert list(out) == ["sum"]


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"x": np.ones((1, 3), np.float32), "z": np.ones((1, 3), np.float32)}, "unknown input 'z'"),
        ({"x": np.ones((1, 3), np.float32)}, "missing input 'y'"),
        ({"x": np.ones((1, 3), np.float64), "y": np.ones((1, 3), np.float32)},
         "'x' expects float32, got numpy float64"),
        ({"x": np.ones((1, 4), np.float32), "y": np.ones((1, 4), np.float32)}, r"'x' expects shape \[N,3\]"),
        ({"x": np.ones((3,), np.float32), "y": np.ones((3,), np.float32)}, "expects rank 2"),
        ({"x": np.ones((2, 3), np.float32), "y": np.ones((5, 3), np.float32)}, "'N' = 2 elsewhere, got 5"),
    ],
)
def test_input_errors_are_clear(feeds: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Interpreter(_model()).run(feeds)


def test_wrong_torch_dtype_has_a_hint() -> None:
    with pytest.raises(InputError) as e:
        Interpreter(_model()).run({"x": torch.ones(1, 3, dtype=torch.int64), "y": torch.ones(1, 3)})
    assert "x.to(torch.float32)" in str(e.value)


def test_unknown_output_name() -> None:
    x = np.ones((1, 3), np.float32)
    with pytest.raises(InputError, match="unknown output 'nope'"):
        Interpreter(_model()).run({"x": x, "y": x}, outputs=["nope"])
