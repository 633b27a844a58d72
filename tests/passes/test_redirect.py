"""The redirect helpers the cleanup passes share: `graphs`, `can_redirect`, `try_redirect` (rewrite.py)."""

from __future__ import annotations

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.passes.rewrite import can_redirect, graphs, try_redirect

F32 = DType.FLOAT32


def _model() -> tuple[Graph, Graph]:
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("n",)))
    c = g.add_input("c", TensorType(DType.BOOL, ()))
    body, other = Graph("then", parent=g), Graph("else", parent=g)
    (t,) = body.add("Identity", [x])
    body.outputs = [t]
    other.outputs = [x]
    (i,) = g.add("If", [c], {"then_branch": body, "else_branch": other})
    (r,) = g.add("Relu", [i])
    (y,) = g.add("Identity", [r], outputs=["y"])
    g.outputs = [y]
    return g, body


def test_graphs_lists_bodies_outermost_first() -> None:
    g, _ = _model()
    assert [s.name for s in graphs(g)] == ["main", "then", "else"]


def test_model_outputs_take_only_values_the_graph_defines() -> None:
    g, _ = _model()
    y, r, x = g.outputs[0], g.nodes[1].outputs[0], g.inputs[0]
    w = g.add_initializer("w", torch.ones(2))
    assert can_redirect(g, y, r) and can_redirect(g, y, w)
    assert not can_redirect(g, y, x)  # a model input cannot be renamed to the output's name
    assert can_redirect(g, r, x)  # not an output: any value will do


def test_try_redirect_keeps_the_name_and_declared_type() -> None:
    g, _ = _model()
    y, r = g.outputs[0], g.nodes[1].outputs[0]
    y.type = TensorType(F32, ("n",))
    r.type = TensorType(F32, None)
    assert try_redirect(g, y, r)
    assert g.outputs == [r] and r.name == "y" and r.type == TensorType(F32, ("n",))


def test_in_a_body_an_output_may_become_an_outer_value_without_renaming() -> None:
    g, body = _model()
    (t,) = body.outputs
    x = g.inputs[0]
    assert try_redirect(body, t, x)
    assert body.outputs == [x] and x.name == "x"
