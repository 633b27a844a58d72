"""The rewriting tools the passes share: toposort, redirect, fuse (into one Fused node), and the manager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.ir.verify import verify
from kiln.passes.manager import PassResult, run_passes
from kiln.passes.rewrite import Uses, fuse, redirect
from kiln.runtime.serialize import graph_from_json, graph_to_json
from kiln.utils.errors import GraphError

X = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)


def _conv_relu_add() -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, ("N", 3, 8, 8)))
    w = g.add_initializer("w", torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)))
    b = g.add_initializer("b", torch.randn(4, generator=torch.Generator().manual_seed(1)))
    (c,) = g.add("Conv", [x, w, b], {"pads": (1, 1, 1, 1)}, name="conv1", outputs=["c"])
    (r,) = g.add("Relu", [c], name="relu1", outputs=["r"])
    (s,) = g.add("Add", [r, c], name="add1", outputs=["s"])
    g.outputs = [s, r]
    return g


def test_fuse_keeps_function_names_and_outputs() -> None:
    g = _conv_relu_add()
    ref = Interpreter(g).run({"x": X})
    node = fuse(g, g.nodes[:2], "epilogue")
    verify(g, types=True)
    assert node.op == "Fused" and node.name == "conv1 + relu1" and node.attrs["kind"] == "epilogue"
    assert [v.name for v in node.outputs] == ["c", "r"]  # both used outside the region
    assert [n.op for n in g.nodes] == ["Fused", "Add"]
    out = Interpreter(g).run({"x": X})
    assert list(out) == ["s", "r"]
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k])


def test_fused_graph_survives_serialization() -> None:
    g = _conv_relu_add()
    fuse(g, g.nodes[:3], "epilogue")
    w: dict = {}
    g2 = graph_from_json(graph_to_json(g, w), w)
    verify(g2, types=True)
    np.testing.assert_array_equal(Interpreter(g2).run({"x": X})["s"], Interpreter(_conv_relu_add()).run({"x": X})["s"])


def test_redirect_keeps_graph_output_names() -> None:
    g = _conv_relu_add()
    relu = g.nodes[1]
    (alt,) = g.add("Identity", [g.nodes[0].outputs[0]], outputs=["alt"])
    redirect(g, relu.outputs[0], alt)
    assert g.outputs[1] is alt and alt.name == "r"
    assert Uses.of(g).count(relu.outputs[0]) == 0


def test_toposort_is_stable_and_finds_cycles() -> None:
    g = _conv_relu_add()
    g.nodes.reverse()
    g.toposort()
    assert [n.name for n in g.nodes] == ["conv1", "relu1", "add1"]
    g.nodes[0].inputs[0] = g.nodes[2].outputs[0]  # conv reads add's output: a cycle
    with pytest.raises(GraphError, match="cycle"):
        g.toposort()


def test_manager_sorts_verifies_and_records() -> None:
    g = _conv_relu_add()

    def fuse_first_two(graph: Graph) -> PassResult:
        fuse(graph, graph.nodes[:2], "epilogue")
        return PassResult.of(fused=1)

    records = run_passes(g, [("fuse_first_two", fuse_first_two)])
    assert records[0].result.counts == {"fused": 1} and records[0].nodes_after == 2


def test_dead_nodes_removes_unread_chains_and_weights() -> None:
    from kiln.passes.dead_nodes import dead_nodes

    g = _conv_relu_add()
    x = g.inputs[0]
    (sh,) = g.add("Shape", [x])
    g.add("Gather", [sh, g.add_initializer("idx", torch.tensor(0))])
    g.add_initializer("orphan", torch.ones(3))
    result = dead_nodes(g)
    assert result.counts == {"nodes_removed": 2, "weights_removed": 2}
    assert [n.name for n in g.nodes] == ["conv1", "relu1", "add1"] and set(g.initializers) == {"w", "b"}


def test_a_branch_returning_an_outer_value_counts_as_a_reader() -> None:
    """If's then_branch returns %r (computed outside) as is: dead_nodes keeps its producer, redirect and
    replace_uses update the branch's output, toposort keeps the producer first."""
    from kiln.passes.dead_nodes import dead_nodes

    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, (2,)))
    cond = g.add_input("cond", TensorType(DType.BOOL, ()))
    (r,) = g.add("Relu", [x], name="relu", outputs=["r"])
    then, other = Graph("then", parent=g), Graph("else", parent=g)
    then.outputs = [r]
    other.outputs = [other.add("Neg", [x])[0]]
    (y,) = g.add("If", [cond], {"then_branch": then, "else_branch": other}, outputs=["y"])
    g.outputs = [y]
    assert not dead_nodes(g).changed and Uses.of(g).count(r) == 1
    g.nodes.reverse()
    g.toposort()
    assert [n.op for n in g.nodes] == ["Relu", "If"]
    (alt,) = g.add("Abs", [x], outputs=["alt"])
    redirect(g, r, alt)
    assert then.outputs == [alt]
    assert g.replace_uses(alt, r) == 1 and then.outputs == [r]
    verify(g, types=True)


def test_fuse_keeps_the_callers_uses_current() -> None:
    g = _conv_relu_add()
    uses = Uses.of(g)
    fuse(g, g.nodes[:2], "epilogue", uses=uses)  # conv1 + relu1: both outputs read outside (by add1, the graph)
    fuse(g, g.nodes[1:], "pointwise", uses=uses)  # add1 alone
    fresh = Uses.of(g)

    own = set(g.value_map().values())  # Uses.of also lists the values inside fused bodies

    def as_sets(u: Uses) -> dict[str, set[str]]:
        return {v.name: {n.name for n in rs} for v, rs in u.readers.items() if rs and v in own}

    assert as_sets(uses) == as_sets(fresh) and uses.outputs == fresh.outputs
    verify(g, types=True)
    np.testing.assert_array_equal(Interpreter(g).run({"x": X})["s"], Interpreter(_conv_relu_add()).run({"x": X})["s"])
