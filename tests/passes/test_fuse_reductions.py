"""fuse_reductions: sum / N -> mean, sums of squares -> ReduceSumSquare / ReduceL2, F.normalize's Expand."""

from __future__ import annotations

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.fuse_reductions import fuse_reductions
from tests.passes.pattern_util import ops, rand, rewrite_preserves

X = {"x": rand(2, 6, 5)}


def _c(g: Graph, value, dtype: torch.dtype = torch.float32) -> Value:
    return g.add_initializer(g.fresh_name("c"), torch.tensor(value, dtype=dtype))


def _input(g: Graph) -> Value:
    return g.add_input("x", TensorType(DType.FLOAT32, ("batch", 6, 5)))


def _sum(g: Graph, x: Value, axes: list[int], keepdims: int = 1, op: str = "ReduceSum") -> Value:
    (s,) = g.add(op, [x, _c(g, axes, torch.int64)], {"keepdims": keepdims})
    return s


@pytest.mark.parametrize("form", ["div", "mul"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_sum_over_count_is_mean(form: str, keepdims: int) -> None:
    def build() -> Graph:
        g = Graph()
        s = _sum(g, _input(g), [1, 2], keepdims)
        (y,) = g.add("Div", [s, _c(g, 30.0)]) if form == "div" else g.add("Mul", [_c(g, 1 / 30), s])
        g.rename(y, "y")
        g.outputs = [y]
        return g

    g, res = rewrite_preserves(build, fuse_reductions, X)
    assert ops(g) == ["ReduceMean"] and res.counts == {"mean": 1}
    assert g.nodes[0].attrs["keepdims"] == keepdims


def test_wrong_count_is_no_mean() -> None:
    def build() -> Graph:
        g = Graph()
        (y,) = g.add("Div", [_sum(g, _input(g), [1]), _c(g, 5.0)], outputs=["y"])  # axis 1 has 6 elements
        g.outputs = [y]
        return g

    _g, res = rewrite_preserves(build, fuse_reductions, X)
    assert not res.changed


def test_variance_of_squares_is_a_mean_not_a_sum_square() -> None:
    def build() -> Graph:
        g = Graph()
        x = _input(g)
        (sq,) = g.add("Mul", [x, x])
        (y,) = g.add("Div", [_sum(g, sq, [-1]), _c(g, 5.0)], outputs=["y"])
        g.outputs = [y]
        return g

    g, res = rewrite_preserves(build, fuse_reductions, X)
    assert ops(g) == ["Mul", "ReduceMean"] and res.counts == {"mean": 1}


@pytest.mark.parametrize("root", ["Sqrt", "Pow"])
def test_sum_of_squares_and_l2(root: str) -> None:
    def build() -> Graph:
        g = Graph()
        x = _input(g)
        (sq,) = g.add("Pow", [x, _c(g, 2.0)])
        s = _sum(g, sq, [1])
        (y,) = g.add("Sqrt", [s]) if root == "Sqrt" else g.add("Pow", [s, _c(g, 0.5)])
        g.rename(y, "y")
        (ss,) = g.add("ReduceSum", [g.add("Mul", [x, x])[0], _c(g, [2], torch.int64)], outputs=["ss"])
        g.outputs = [y, ss]
        return g

    g, res = rewrite_preserves(build, fuse_reductions, X)
    assert sorted(ops(g)) == ["ReduceL2", "ReduceSumSquare"]
    assert res.counts == {"sum_square": 2, "l2": 1}


def test_torch_normalize_drops_the_expand() -> None:
    def build() -> Graph:
        g = Graph()
        x = _input(g)
        n = _sum(g, x, [1], op="ReduceL2")
        (c,) = g.add("Clip", [n, _c(g, 1e-12), None])
        (shape,) = g.add("Shape", [x])
        (e,) = g.add("Expand", [c, shape])
        (y,) = g.add("Div", [x, e], outputs=["y"])
        g.outputs = [y]
        return g

    feeds = {"x": rand(2, 6, 5) * (rand(2, 1, 5, seed=1) > 0)}  # some all-zero columns: 0 / eps = 0
    g, res = rewrite_preserves(build, fuse_reductions, feeds)
    assert ops(g) == ["ReduceL2", "Clip", "Div"] and res.counts == {"l2_normalize": 1}

