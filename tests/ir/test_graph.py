from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType, Value
from kiln.ir.ops import get_op
from kiln.ir.printer import format_graph
from kiln.ir.verify import verify
from kiln.utils.errors import GraphError, ShapeError, UnsupportedError


def _graph() -> tuple[Graph, Value, Value]:
    g = Graph("g")
    x = g.add_input("x", TensorType(DType.FLOAT32, ("N", 3)))
    b = g.add_initializer("b", torch.tensor([1.0, 2.0, 3.0]))
    (y,) = g.add("Add", [x, b], name="add")
    (z,) = g.add("Relu", [y], name="relu")
    g.outputs.append(z)
    return g, x, z


def test_add_infers_types_and_links_producers() -> None:
    g, _, z = _graph()
    assert z.type == TensorType(DType.FLOAT32, ("N", 3))
    assert z.producer is g.nodes[1] and g.nodes[1].inputs[0] is g.nodes[0].outputs[0]
    assert g.op_counts() == {"Add": 1, "Relu": 1}
    verify(g, types=True)


def test_broadcast_inference_symbolic_and_static() -> None:
    g = Graph()
    a = g.add_input("a", TensorType(DType.FLOAT32, ("N", 1, 5)))
    b = g.add_input("b", TensorType(DType.FLOAT32, (4, 1)))
    (c,) = g.add("Mul", [a, b])
    assert c.shape == ("N", 4, 5)
    u = g.add_input("u", TensorType(DType.FLOAT32, None))
    (d,) = g.add("Add", [a, u])
    assert d.shape is None


def test_broadcast_mismatch_names_the_node() -> None:
    g = Graph()
    a = g.add_input("a", TensorType(DType.FLOAT32, (2, 3)))
    b = g.add_input("b", TensorType(DType.FLOAT32, (4, 3)))
    with pytest.raises(ShapeError, match=r"node 'bad' \(Add\).*broadcast"):
        g.add("Add", [a, b], name="bad")


def test_unknown_attribute_and_op_are_errors() -> None:
    g = Graph()
    a = g.add_input("a", TensorType(DType.FLOAT32, (2,)))
    with pytest.raises(UnsupportedError, match="attribute 'alpha'"):
        g.add("Relu", [a], {"alpha": 1.0})
    with pytest.raises(UnsupportedError, match="NoSuchOp"):
        get_op("NoSuchOp")


def test_names_stay_unique() -> None:
    g = Graph()
    a = g.add_input("x", TensorType(DType.FLOAT32, (2,)))
    (y,) = g.add("Relu", [a], outputs=["x"])
    assert y.name != a.name


def test_verify_catches_use_before_definition() -> None:
    g, _, _ = _graph()
    g.nodes.reverse()
    with pytest.raises(GraphError, match="before it is defined"):
        verify(g)


def test_verify_catches_an_output_never_computed() -> None:
    g, _, _ = _graph()
    g.outputs.append(Value.tensor("ghost", DType.FLOAT32, (1,)))
    with pytest.raises(GraphError, match="ghost"):
        verify(g)


def test_printer_is_readable() -> None:
    g, _, _ = _graph()
    text = format_graph(g)
    assert "graph g" in text
    assert "%x: float32[N,3]" in text
    assert "= Add(%x, %b)  # add" in text
    assert "outputs: %relu_out0" in text or "outputs: %" in text


def test_string_initializer() -> None:
    g = Graph()
    v = g.add_initializer("s", np.array(["a", "b"], dtype=object))
    assert v.type == TensorType(DType.STRING, (2,))


def test_small_constant_subgraphs_are_precomputed_for_inference() -> None:
    # shape = Concat(Constant[2], Mul(Constant[3], Constant[2])) is only known by computing it.
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, (2, 3, 2)))
    (a,) = g.add("Constant", [], {"value": torch.tensor([2])})
    (b,) = g.add("Constant", [], {"value": torch.tensor([3])})
    (c,) = g.add("Mul", [b, a])
    (shape,) = g.add("Concat", [a, c], {"axis": 0})
    assert shape.folded is not None and shape.folded.tolist() == [2, 6]
    assert shape.producer is not None and shape.producer.op == "Concat"  # the node stays; only a cache is set
    (y,) = g.add("Reshape", [x, shape])
    assert y.shape == (2, 6)
    # Values computed from graph inputs are not folded.
    (z,) = g.add("Relu", [x])
    assert z.folded is None
