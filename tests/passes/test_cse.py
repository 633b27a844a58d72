"""Common-subexpression elimination: duplicated nodes and equal constants merge; random ops, different
attributes or dtypes and two model outputs do not."""

from __future__ import annotations

import numpy as np
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.passes.cse import eliminate_common_subexpressions as cse
from kiln.passes.dead_nodes import dead_nodes
from tests.passes.cleanup_util import all_ops, ops, preserves, rand

F32, I64 = DType.FLOAT32, DType.INT64


def _duplicated_chains() -> Graph:
    """Three `Shape(x) -> Gather(1)` chains (each with its own index constant) feeding three Reshapes' targets."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("b", "s", 8)))
    outs = []
    for i in range(3):
        (sh,) = g.add("Shape", [x])
        (d,) = g.add("Gather", [sh, g.add_initializer(f"one{i}", torch.tensor([1]))])
        (t,) = g.add("Concat", [d, g.add_initializer(f"rest{i}", torch.tensor([-1]))], {"axis": 0})
        (r,) = g.add("Reshape", [x, t])
        outs.append(g.add("Relu", [r])[0])
    (a,) = g.add("Add", [outs[0], outs[1]])
    (y,) = g.add("Add", [a, outs[2]], outputs=["y"])
    g.outputs = [y]
    return g


def test_duplicated_chains_merge() -> None:
    feeds = [{"x": rand(2, 3, 8)}, {"x": rand(1, 4, 8)}]
    g, result = preserves(_duplicated_chains, [cse, dead_nodes], feeds)
    assert result.counts == {"weights_merged": 4, "nodes_merged": 10}
    assert ops(g) == ["Shape", "Gather", "Concat", "Reshape", "Relu", "Add", "Add"]
    assert len(g.initializers) == 2


def test_what_differs_is_not_merged() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (4,)))
    a = g.add_initializer("a", torch.tensor([1.0, 2.0]))
    b = g.add_initializer("b", torch.tensor([1.0, 2.0], dtype=torch.float64))  # another dtype
    c = g.add_initializer("c", torch.tensor([1.0, 2.5]))
    d = g.add_initializer("d", torch.tensor([[1.0, 2.0]]))  # another shape
    e = g.add_initializer("e", torch.tensor([1.0, 2.0]).expand(1, 2)[0])  # equal bytes, a view with strides
    n1 = g.add("LeakyRelu", [x], {"alpha": 0.1})[0]
    n2 = g.add("LeakyRelu", [x], {"alpha": 0.2})[0]
    r1 = g.add("RandomNormalLike", [x])[0]
    r2 = g.add("RandomNormalLike", [x])[0]
    g.outputs = [a, b, c, d, e, n1, n2, r1, r2]
    names = [v.name for v in g.outputs]
    result = cse(g)
    assert result.counts == {"weights_merged": 0, "nodes_merged": 0}  # e equals a, but both are outputs
    assert [v.name for v in g.outputs] == names


def test_equal_constants_merge_and_outputs_keep_their_names() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2,)))
        (k1,) = g.add("Constant", [], {"value": torch.tensor([3.0, 4.0])})
        (k2,) = g.add("Constant", [], {"value": torch.tensor([3.0, 4.0])})
        w1, w2 = g.add_initializer("w1", torch.zeros(2)), g.add_initializer("w2", torch.zeros(2))
        (y,) = g.add("Mul", [x, k1], outputs=["y"])
        (z,) = g.add("Mul", [x, k2], outputs=["z"])  # the same value as y, but both are outputs
        (u,) = g.add("Add", [y, w1], outputs=["u"])
        (v,) = g.add("Add", [y, w2])
        (s,) = g.add("Sub", [u, v], outputs=["s"])
        g.outputs = [y, z, u, s]
        return g

    g, result = preserves(build, cse, {"x": rand(2)})
    assert result.counts == {"weights_merged": 1, "nodes_merged": 2}  # w2; k2, then Add(y, w2) into u
    assert ops(g) == ["Constant", "Mul", "Mul", "Add", "Sub"]


def test_shape_values_equal_as_symbols_merge_across_tensors() -> None:
    def build() -> Graph:
        g = Graph()
        ids = g.add_input("ids", TensorType(I64, ("b", "s")))
        h = g.add_input("h", TensorType(F32, ("b", "s", 8)))
        seqs = []
        for v, k in ((ids, "a"), (h, "b")):
            (sh,) = g.add("Shape", [v])
            (d,) = g.add("Gather", [sh, g.add_initializer(f"i{k}", torch.tensor(1))])
            seqs.append(g.add("Range", [g.add_initializer(f"z{k}", torch.tensor(0)), d,
                                        g.add_initializer(f"o{k}", torch.tensor(1))])[0])
        (y,) = g.add("Add", seqs, outputs=["y"])
        g.outputs = [y]
        return g

    feeds = {"ids": np.zeros((2, 5), np.int64), "h": rand(2, 5, 8)}
    g, _ = preserves(build, [cse, dead_nodes], feeds)
    assert ops(g) == ["Shape", "Gather", "Range", "Add"]


def test_each_body_on_its_own() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2,)))
        c = g.add_input("c", TensorType(DType.BOOL, ()))
        (outer,) = g.add("Exp", [x])
        then_g, else_g = Graph("then", parent=g), Graph("else", parent=g)
        (t1,) = then_g.add("Exp", [x])  # equals `outer`, but lives in the body: not merged across graphs
        (t2,) = then_g.add("Exp", [x])
        (t,) = then_g.add("Add", [t1, t2])
        then_g.outputs = [t]
        else_g.outputs = [outer]
        (i,) = g.add("If", [c], {"then_branch": then_g, "else_branch": else_g})
        (y,) = g.add("Mul", [i, outer], outputs=["y"])
        g.outputs = [y]
        return g

    g, result = preserves(build, [cse, dead_nodes], [{"x": rand(2), "c": np.array(v)} for v in (True, False)])
    assert result.counts["nodes_merged"] == 1
    assert all_ops(g) == ["Exp", "If", "Exp", "Add", "Mul"]
