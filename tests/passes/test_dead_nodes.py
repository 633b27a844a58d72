"""Dead-node elimination inside If/Loop bodies (the flat cases are in test_rewrite.py)."""

from __future__ import annotations

import numpy as np
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.passes.dead_nodes import dead_nodes
from tests.passes.cleanup_util import all_ops, preserves, rand

F32 = DType.FLOAT32


def _model() -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2,)))
    c = g.add_input("c", TensorType(DType.BOOL, ()))
    (only_dead_reads,) = g.add("Exp", [x])
    then_g, else_g = Graph("then", parent=g), Graph("else", parent=g)
    then_g.add("Mul", [only_dead_reads, then_g.add_initializer("unused", torch.ones(2))])  # read by nothing
    (t,) = then_g.add("Neg", [x])
    then_g.outputs = [t]
    else_g.outputs = [x]
    (y,) = g.add("If", [c], {"then_branch": then_g, "else_branch": else_g}, outputs=["y"])
    g.outputs = [y]
    return g


def test_dead_nodes_inside_bodies_and_what_only_they_read() -> None:
    feeds = [{"x": rand(2), "c": np.array(v)} for v in (True, False)]
    g, result = preserves(_model, dead_nodes, feeds)
    assert result.counts == {"nodes_removed": 2, "weights_removed": 1}
    assert all_ops(g) == ["If", "Neg"]
