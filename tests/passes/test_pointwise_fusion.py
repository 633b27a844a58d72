"""pointwise_fusion: convex groups of elementwise ops -> Fused[pointwise] with one iteration domain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node, Value
from kiln.ir.ops import OPS
from kiln.passes.pointwise_fusion import ELEMENTWISE, pointwise_fusion
from tests.passes.same_function import randn, run_checked

F32 = DType.FLOAT32


def _graph(*shapes: tuple) -> tuple[Graph, list[Value]]:
    g = Graph()
    return g, [g.add_input(f"x{i}", TensorType(F32, s)) for i, s in enumerate(shapes)]


def _bodies(g: Graph) -> list[list[str]]:
    return [[m.op for m in n.attrs["body"].nodes] for n in g.nodes if n.op == "Fused"]


def _fused(g: Graph) -> list[Node]:
    return [n for n in g.nodes if n.op == "Fused"]


def test_the_elementwise_set_is_in_the_op_table() -> None:
    assert all(op in OPS for op in ELEMENTWISE)


def test_a_chain_with_constants_and_symbolic_dims() -> None:
    g, (x,) = _graph(("B", "S", 8))
    (e,) = g.add("Exp", [x])
    (m,) = g.add("Mul", [e, g.add_initializer("k", torch.full((8,), 0.5))])
    (c,) = g.add("Cast", [m], {"to": DType.FLOAT16})
    g.outputs = [g.add("Cast", [c], {"to": F32}, outputs=["y"])[0]]
    results = run_checked(g, [pointwise_fusion], [{"x0": randn(2, 3, 8)}, {"x0": randn(1, 7, 8)}], rel=0)
    assert results[0].counts == {"groups": 1, "nodes_fused": 4}
    assert _bodies(g) == [["Exp", "Mul", "Cast", "Cast"]] and g.nodes[0].attrs["kind"] == "pointwise"
    assert [v.name for v in g.outputs] == ["y"]


def test_a_dag_with_a_broadcast_input_and_where() -> None:
    """x * sigmoid(x) + bias, masked: one group reading x, the bias and the mask."""
    g, (x, bias) = _graph(("N", 4, 5), (4, 1))
    (s,) = g.add("Sigmoid", [x])
    (m,) = g.add("Mul", [x, s])
    (a,) = g.add("Add", [m, bias])
    (gt,) = g.add("Greater", [a, g.add_initializer("zero", torch.tensor(0.0))])
    g.outputs = [g.add("Where", [gt, a, x], outputs=["y"])[0]]
    run_checked(g, [pointwise_fusion], [{"x0": randn(2, 4, 5), "x1": randn(4, 1, seed=1)}], rel=0)
    assert [n.op for n in g.nodes] == ["Fused"] and len(_bodies(g)[0]) == 5


def test_a_path_through_a_non_elementwise_op_keeps_the_group_convex() -> None:
    g, (x,) = _graph((2, 8))
    (e,) = g.add("Exp", [x], name="exp")
    (sm,) = g.add("Softmax", [e], name="softmax")
    (a,) = g.add("Add", [e, sm], name="add")
    g.outputs = [g.add("Neg", [a], name="neg", outputs=["y"])[0]]
    run_checked(g, [pointwise_fusion], [{"x0": randn(2, 8)}], rel=0)
    assert [n.op for n in g.nodes] == ["Exp", "Softmax", "Fused"] and _bodies(g) == [["Add", "Neg"]]


def test_multi_output_groups_keep_names() -> None:
    g, (x,) = _graph((3, 4))
    (e,) = g.add("Exp", [x], outputs=["e"])
    (n,) = g.add("Neg", [e])
    (t,) = g.add("ReduceSum", [e], outputs=["t"])
    g.outputs = [g.add("Abs", [n], outputs=["y"])[0], t]
    run_checked(g, [pointwise_fusion], [{"x0": randn(3, 4)}], rel=0)
    (f,) = _fused(g)
    assert sorted(v.name for v in f.outputs) == ["e", "y"] and g.nodes[-1].op == "ReduceSum"


def test_a_small_value_is_recomputed_inside_but_never_written_out() -> None:
    """Squeeze-excite: sigmoid of [N,C,1,1] times [N,C,H,W]: one group over [N,C,H,W]; when the sigmoid is also
    a graph output, the [N,C,1,1] value cannot be written by a kernel over the big domain, so it stays out."""
    for also_output in (False, True):
        g, (x, s) = _graph(("N", 4, 5, 5), ("N", 4, 1, 1))
        (sg,) = g.add("Sigmoid", [s], outputs=["gate"])
        (y,) = g.add("Relu", [g.add("Mul", [x, sg])[0]], outputs=["y"])
        g.outputs = [y, sg] if also_output else [y]
        run_checked(g, [pointwise_fusion], [{"x0": randn(2, 4, 5, 5), "x1": randn(2, 4, 1, 1, seed=1)}], rel=0)
        assert _bodies(g) == ([["Mul", "Relu"]] if also_output else [["Sigmoid", "Mul", "Relu"]])


def test_two_groups_never_form_a_cycle() -> None:
    """p1 -> p2 and q1 -> q2 are each fusable, but p1 -> X -> q2 and q1 -> Y -> p2 (X, Y not elementwise):
    fusing both pairs would make the two fused nodes read each other."""
    g, (x,) = _graph((2, 6))
    (p1,) = g.add("Exp", [x], name="p1")
    (q1,) = g.add("Neg", [x], name="q1")
    (xx,) = g.add("Softmax", [p1], name="X")
    (yy,) = g.add("Softmax", [q1], name="Y")
    (p2,) = g.add("Add", [p1, yy], name="p2", outputs=["p"])
    (q2,) = g.add("Add", [q1, xx], name="q2", outputs=["q"])
    g.outputs = [p2, q2]
    run_checked(g, [pointwise_fusion], [{"x0": randn(2, 6)}], rel=0)
    assert len(_fused(g)) == 1


def test_what_is_not_fused() -> None:
    """Random ops, a lone elementwise op and values of unknown rank stay; elementwise ops after a data-dependent
    op (NonZero's count is a fresh dim of a known rank) still fuse."""
    g, (x,) = _graph((2, 3))
    (r,) = g.add("RandomUniformLike", [x], {"seed": 1.0})
    (a,) = g.add("Add", [x, r])
    (nz,) = g.add("NonZero", [a])
    (y,) = g.add("Neg", [g.add("Cast", [nz], {"to": F32})[0]], outputs=["y"])
    u = g.add_input("u", TensorType(F32, None))
    g.outputs = [y, g.add("Neg", [g.add("Exp", [u])[0]], outputs=["z"])[0]]
    assert pointwise_fusion(g).counts == {"groups": 1, "nodes_fused": 2}
    assert [n.op for n in g.nodes] == ["RandomUniformLike", "Add", "NonZero", "Fused", "Exp", "Neg"]
    assert _bodies(g) == [["Cast", "Neg"]]


def test_expand_with_a_constant_shape_joins() -> None:
    g, (x,) = _graph((3, 1))
    (e,) = g.add("Expand", [x, g.add_initializer("shape", torch.tensor([2, 3, 4]))])
    g.outputs = [g.add("Sqrt", [g.add("Abs", [e])[0]], outputs=["y"])[0]]
    run_checked(g, [pointwise_fusion], [{"x0": randn(3, 1)}], rel=0)
    assert _bodies(g) == [["Expand", "Abs", "Sqrt"]]


@pytest.mark.parametrize("taken", [True, False])
def test_fuses_inside_subgraphs(taken: bool) -> None:
    g, (x,) = _graph((2, 3))
    cond = g.add_input("cond", TensorType(DType.BOOL, ()))
    then = Graph("then", parent=g)
    then.outputs = [then.add("Neg", then.add("Exp", [x]))[0]]
    other = Graph("else", parent=g)
    other.outputs = [x]  # a branch returning an outer value as is
    g.outputs = [g.add("If", [cond], {"then_branch": then, "else_branch": other}, outputs=["y"])[0]]
    run_checked(g, [pointwise_fusion], [{"x0": randn(2, 3), "cond": np.array(taken)}], rel=0)
    assert [n.op for n in then.nodes] == ["Fused"]
