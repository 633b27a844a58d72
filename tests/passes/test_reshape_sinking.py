"""Reshape sinking: a Reshape between two elementwise ops moves below the second (so pointwise fusion makes one
kernel of both); it stays where the second op grows the shape, reads a tensor operand, or the values branch."""

from __future__ import annotations

import numpy as np
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.passes.pointwise_fusion import pointwise_fusion
from kiln.passes.reshape_sinking import sink_reshapes
from tests.passes.cleanup_util import ops, preserves, rand

F32 = DType.FLOAT32


def _bert_mask() -> Graph:
    """BERT's export: the int64 attention mask cast, reshaped to [batch, 1, 1, seq], then Where(mask, 0, min)."""
    g = Graph()
    m = g.add_input("mask", TensorType(DType.INT64, ("n", 6)))
    (c,) = g.add("Cast", [m], {"to": DType.BOOL})
    shape = g.add_initializer("shape", torch.tensor([-1, 1, 1, 6]))
    (r,) = g.add("Reshape", [c, shape])
    (y,) = g.add("Where", [r, g.add_initializer("zero", torch.tensor(0.0)),
                           g.add_initializer("low", torch.tensor([[[[-3.0e38]]]]))], outputs=["y"])
    g.outputs = [y]
    return g


MASKS = [{"mask": np.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=np.int64)},
         {"mask": np.array([[1, 0, 1, 1, 1, 0]], dtype=np.int64)}]


def test_the_attention_mask_preparation_becomes_one_kernel() -> None:
    g, result = preserves(_bert_mask, sink_reshapes, MASKS)
    assert result.counts == {"reshapes_sunk": 1}
    assert ops(g) == ["Cast", "Where", "Reshape"]
    where = g.nodes[1]
    assert where.outputs[0].shape == ("n", 6) and where.inputs[2].shape == ()  # the [1,1,1,1] constant, as a scalar
    assert g.nodes[-1].outputs[0].name == "y" and g.nodes[-1].outputs[0].shape == ("n", 1, 1, 6)
    pointwise_fusion(g)
    assert ops(g) == ["Fused", "Reshape"]


def test_a_reshape_moves_down_a_chain() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2, 12)))
        (a,) = g.add("Relu", [x])
        (f,) = g.add("Unsqueeze", [a, g.add_initializer("axes", torch.tensor([1]))])
        (b,) = g.add("Mul", [g.add_initializer("two", torch.tensor([2.0])), f])
        (c,) = g.add("Tanh", [b])
        (y,) = g.add("Add", [c, g.add_initializer("one", torch.tensor(1.0))], outputs=["y"])
        g.outputs = [y]
        return g

    g, result = preserves(build, sink_reshapes, {"x": rand(2, 12)})
    assert result.counts == {"reshapes_sunk": 3}
    assert ops(g) == ["Relu", "Mul", "Tanh", "Add", "Unsqueeze"]


def test_left_alone_unless_it_joins_two_elementwise_ops_at_the_same_size() -> None:
    def build(case: str) -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2, 12)))
        (a,) = g.add("MatMul", [x, g.add_initializer("w", torch.ones(12, 12))]) if case == "after a matmul" \
            else g.add("Relu", [x])
        (r,) = g.add("Reshape", [a, g.add_initializer("shape", torch.tensor([2, 3, 4]))])
        operand = {"tensor operand": torch.ones(3, 4), "grows": torch.ones(5, 1, 1, 1)}.get(case, torch.tensor(2.0))
        other = g.add_initializer("other", operand)
        (y,) = g.add("Mul", [r, other], outputs=["y"])
        outs = [y]
        if case == "branches":
            (z,) = g.add("Neg", [r], outputs=["z"])
            outs.append(z)
        if case == "read elsewhere":
            outs.append(a)
        g.outputs = outs
        return g

    for case in ("after a matmul", "tensor operand", "grows", "branches", "read elsewhere"):
        g, result = preserves(lambda c=case: build(c), sink_reshapes, {"x": rand(2, 12)})
        assert not result.changed, case
        assert "Reshape" in ops(g) and ops(g).index("Reshape") == 1, case
