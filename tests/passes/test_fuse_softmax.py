"""fuse_softmax: exp / sum(exp) (with or without the max shift) and the log forms become (Log)Softmax."""

from __future__ import annotations

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.fuse_softmax import fuse_softmax
from tests.passes.pattern_util import ops, rand, rewrite_preserves

X = {"x": rand(2, 3, 7) * 5}


def _reduce(g: Graph, op: str, x: Value, axis: int, keepdims: int = 1) -> Value:
    axes = g.add_initializer(g.fresh_name("axes"), torch.tensor([axis]))
    (r,) = g.add(op, [x, axes], {"keepdims": keepdims})
    return r


def softmax(*, shift: bool = True, axis: int = -1, sum_axis: int | None = None, reciprocal: bool = False,
            log: bool = False) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", 3, 7)))
    z = x
    if shift:
        (z,) = g.add("Sub", [x, _reduce(g, "ReduceMax", x, axis)])
    (e,) = g.add("Exp", [z])
    s = _reduce(g, "ReduceSum", e, axis if sum_axis is None else sum_axis)
    if log:
        (ls,) = g.add("Log", [s])
        (y,) = g.add("Sub", [z, ls], outputs=["y"])
    elif reciprocal:
        (r,) = g.add("Reciprocal", [s])
        (y,) = g.add("Mul", [r, e], outputs=["y"])
    else:
        (y,) = g.add("Div", [e, s], outputs=["y"])
    g.outputs = [y]
    return g


@pytest.mark.parametrize("kw", [{}, {"shift": False}, {"reciprocal": True}, {"axis": 1}])
def test_softmax_forms(kw) -> None:
    g, res = rewrite_preserves(lambda: softmax(**kw), fuse_softmax, X)
    assert ops(g) == ["Softmax"] and res.counts == {"softmax": 1}
    assert g.nodes[0].attrs["axis"] == (-2 if kw.get("axis") == 1 else -1) and g.nodes[0].inputs[0] is g.inputs[0]


@pytest.mark.parametrize("shift", [True, False])
def test_log_softmax(shift: bool) -> None:
    g, res = rewrite_preserves(lambda: softmax(log=True, shift=shift), fuse_softmax, X)
    assert ops(g) == ["LogSoftmax"] and res.counts == {"log_softmax": 1}


def test_log_sum_exp_and_log_of_softmax() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", 3, 7)))
        (a,) = g.add("Sub", [x, _reduce(g, "ReduceLogSumExp", x, 2)], outputs=["a"])
        (sm,) = g.add("Softmax", [x], {"axis": 1})
        (b,) = g.add("Log", [sm], outputs=["b"])
        g.outputs = [a, b]
        return g

    g, res = rewrite_preserves(build, fuse_softmax, X)
    assert ops(g) == ["LogSoftmax", "LogSoftmax"] and res.counts == {"log_softmax": 2}
    assert [n.attrs["axis"] for n in g.nodes] == [-1, -2]


def test_sum_over_another_axis_keeps_the_shift() -> None:
    """exp(z) / sum over axis 1 is a softmax of z over axis 1, whatever z is; the max over axis 2 stays."""
    g, _ = rewrite_preserves(lambda: softmax(sum_axis=1), fuse_softmax, X)
    assert ops(g) == ["ReduceMax", "Sub", "Softmax"] and g.nodes[2].attrs["axis"] == -2


def test_exp_read_elsewhere_does_not_match() -> None:
    def build() -> Graph:
        g = softmax()
        g.outputs.append(next(n for n in g.nodes if n.op == "Exp").outputs[0])
        return g

    _g, res = rewrite_preserves(build, fuse_softmax, X)
    assert not res.changed


def test_shift_read_elsewhere_keeps_the_shift() -> None:
    """x - max is also an output: softmax of the shifted value (same result), the shift stays."""
    def build() -> Graph:
        g = softmax()
        g.outputs.append(next(n for n in g.nodes if n.op == "Sub").outputs[0])
        return g

    g, _ = rewrite_preserves(build, fuse_softmax, X)
    assert ops(g) == ["ReduceMax", "Sub", "Softmax"]
