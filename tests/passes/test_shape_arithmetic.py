"""Shape arithmetic: exporter shape chains become constants (static dims, from the types or the profile) or
constant targets with 0 / -1 (symbolic dims); Expand shapes and Slice ends likewise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.dead_nodes import dead_nodes
from kiln.passes.manager import PassContext
from kiln.passes.shape_arithmetic import INT64_MAX, reshape_target, shape_arithmetic
from kiln.passes.types import substitute
from tests.passes.cleanup_util import all_ops, ops, preserves, rand

F32, I64 = DType.FLOAT32, DType.INT64


def _dim(g: Graph, shape: Value, i: int) -> Value:
    """Unsqueeze(Gather(shape, i)): one dim as a 1-vector, the way exporters spell it."""
    (d,) = g.add("Gather", [shape, g.add_initializer(f"i{i}", torch.tensor(i))])
    return g.add("Unsqueeze", [d, g.add_initializer(f"ax{i}", torch.tensor([0]))])[0]


def _split_heads() -> Graph:
    """BERT's split into heads: x[batch, seq, 64] -> Reshape(Concat(batch, seq, 4, 16)) -> Transpose."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", "seq", 64)))
    (sh,) = g.add("Shape", [x])
    target = g.add("Concat", [_dim(g, sh, 0), _dim(g, sh, 1), g.add_initializer("heads", torch.tensor([4, 16]))],
                   {"axis": 0})[0]
    (r,) = g.add("Reshape", [x, target])
    (y,) = g.add("Transpose", [r], {"perm": (0, 2, 1, 3)}, outputs=["y"])
    g.outputs = [y]
    return g


FEEDS = [{"x": rand(2, 5, 64)}, {"x": rand(1, 3, 64, seed=1)}]


def test_dynamic_dims_become_copy_dims() -> None:
    g, result = preserves(_split_heads, [shape_arithmetic(PassContext()), dead_nodes], FEEDS)
    assert result.counts["reshape_targets"] == 1
    assert ops(g) == ["Reshape", "Transpose"]
    assert g.nodes[0].inputs[1].data.tolist() == [0, 0, 4, 16]


def test_static_dims_of_the_profile_fold_the_chain() -> None:
    feeds = {"x": rand(1, 5, 64)}
    g, _result = preserves(_split_heads, [shape_arithmetic(PassContext({"batch": 1})), dead_nodes], feeds)
    assert ops(g) == ["Reshape", "Transpose"] and g.nodes[0].inputs[1].data.tolist() == [1, 0, 4, 16]
    assert g.inputs[0].type.shape == ("batch", "seq", 64)  # the model's interface is untouched
    assert g.nodes[0].outputs[0].type.shape == (1, "seq", 4, 16)  # inside, batch is 1
    g, _ = preserves(_split_heads, [shape_arithmetic(PassContext({"batch": 1, "seq": 5})), dead_nodes], feeds)
    assert g.nodes[0].inputs[1].data.tolist() == [1, 5, 4, 16]
    assert g.outputs[0].type.shape == ("batch", 4, "seq", 16)


def _merge_heads() -> Graph:
    """[batch, seq, 64] -> [batch*seq, 64]: one symbolic dim that is not a copy, written -1."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", "seq", 64)))
    (sh,) = g.add("Shape", [x])
    (a,) = g.add("Gather", [sh, g.add_initializer("i0", torch.tensor([0]))])
    (b,) = g.add("Gather", [sh, g.add_initializer("i1", torch.tensor([1]))])
    (n,) = g.add("Mul", [a, b])
    (t,) = g.add("Concat", [n, g.add_initializer("c", torch.tensor([64]))], {"axis": 0})
    (y,) = g.add("Reshape", [x, t], outputs=["y"])
    g.outputs = [y]
    return g


def test_one_other_symbolic_dim_becomes_minus_one() -> None:
    g, _ = preserves(_merge_heads, [shape_arithmetic(PassContext()), dead_nodes], FEEDS)
    assert ops(g) == ["Reshape"] and g.nodes[0].inputs[1].data.tolist() == [-1, 64]


def test_two_unknown_dims_leave_the_reshape_alone() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, ("n", 6)))
        s = g.add_input("s", TensorType(I64, ("a", "b")))
        (sh,) = g.add("Shape", [s])
        (y,) = g.add("Reshape", [x, sh], outputs=["y"])  # [a, b]: neither is a dim of x
        g.outputs = [y]
        return g

    g, result = preserves(build, shape_arithmetic(PassContext()),
                          {"x": rand(4, 6), "s": np.zeros((3, 8), np.int64)})
    assert not result.changed and ops(g) == ["Shape", "Reshape"]


@pytest.mark.parametrize(("src", "dst", "allowzero", "want"), [
    ((2, 3, 4), (6, 4), False, [6, 4]),
    (("b", "s", 64), ("b", "s", 4, 16), False, [0, 0, 4, 16]),
    (("b", "s", 64), ("b*s", 64), False, [-1, 64]),
    (("b", "s", 64), ("s", "b", 64), False, None),  # two dims that are not copies
    (("b", "s", 64), ("b", "s", 4, 16), True, None),  # allowzero: 0 means 0
    (("b", 3), ("b", 0, 3), False, None),  # a static 0 would read as "copy"
    (("b", 4), (1, "b", 4), False, [1, -1, 4]),
])
def test_reshape_target(src: tuple, dst: tuple, allowzero: bool, want: list[int] | None) -> None:
    assert reshape_target(src, dst, allowzero) == want


def test_expand_to_a_computed_shape_keeps_dims_with_ones() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, ("b", 1, "s")))
        y = g.add_input("y", TensorType(F32, ("b", 4, "s")))
        (sh,) = g.add("Shape", [y])
        (e,) = g.add("Expand", [x, sh], outputs=["e"])
        g.outputs = [e]
        return g

    feeds = {"x": rand(2, 1, 3), "y": rand(2, 4, 3)}
    g, result = preserves(build, [shape_arithmetic(PassContext()), dead_nodes], feeds)
    assert result.counts["expand_targets"] == 1 and ops(g) == ["Expand"]
    assert g.nodes[0].inputs[1].data.tolist() == [1, 4, 1]


def test_slice_to_a_computed_end_reads_to_the_end() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, ("b", "s")))
        (sh,) = g.add("Shape", [x])
        (end,) = g.add("Slice", [sh, g.add_initializer("one", torch.tensor([1])), g.add_initializer(
            "two", torch.tensor([2]))])
        (y,) = g.add("Slice", [x, g.add_initializer("start", torch.tensor([1])), end, g.add_initializer(
            "axis", torch.tensor([1]))], outputs=["y"])
        g.outputs = [y]
        return g

    g, result = preserves(build, [shape_arithmetic(PassContext()), dead_nodes], [{"x": rand(2, 5)}, {"x": rand(3, 1)}])
    assert result.counts["slice_ends"] == 1 and ops(g) == ["Slice"]
    assert g.nodes[0].inputs[2].data.tolist() == [INT64_MAX]


def test_chains_inside_a_body_reading_outer_values() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, ("b", 6)))
        c = g.add_input("c", TensorType(DType.BOOL, ()))
        then_g, else_g = Graph("then", parent=g), Graph("else", parent=g)
        (sh,) = then_g.add("Shape", [x])
        (n,) = then_g.add("Slice", [sh, then_g.add_initializer("z", torch.tensor([0])),
                                    then_g.add_initializer("o", torch.tensor([1]))])
        (t,) = then_g.add("Concat", [n, then_g.add_initializer("k", torch.tensor([2, 3]))], {"axis": 0})
        (r,) = then_g.add("Reshape", [x, t])
        (f,) = then_g.add("Flatten", [r])
        then_g.outputs = [f]
        else_g.outputs = [x]
        (y,) = g.add("If", [c], {"then_branch": then_g, "else_branch": else_g}, outputs=["y"])
        g.outputs = [y]
        return g

    feeds = [{"x": rand(2, 6), "c": np.array(v)} for v in (True, False)]
    g, _ = preserves(build, [shape_arithmetic(PassContext()), dead_nodes], feeds)
    assert all_ops(g) == ["If", "Reshape", "Flatten"]
    assert g.nodes[0].attrs["then_branch"].nodes[0].inputs[1].data.tolist() == [0, 2, 3]


def test_substitute_simplifies_expressions() -> None:
    assert substitute("2*b + s", {"b": 3}) == "s+6"
    assert substitute("b*s", {"b": 2, "s": 4}) == 8
    assert substitute("floor(s/2)", {"b": 2}) == "floor(s/2)"
