"""Reduction canonicalization: reduction chains exporters spell out become the single ONNX reductions.

Rewrite cases (sq(x) is Pow(x, 2) or Mul(x, x); N is the number of reduced elements, static):
- ReduceSum(x) / N  or  ReduceSum(x) * (1/N)                 -> ReduceMean(x)   (the mean of a variance too)
- ReduceSum(sq(x))                                           -> ReduceSumSquare(x)  (unless it is a mean, above)
- Sqrt(ReduceSumSquare(x))  or  Pow(ReduceSumSquare(x), 0.5) -> ReduceL2(x)
- L2 normalization, torch's F.normalize export  x / Expand(Clip(ReduceL2(x), eps), Shape(x)):
  the Expand goes (Div broadcasts the same way)              -> x / Clip(ReduceL2(x), eps)
  This is the exact form. LpNormalization is not used: it returns x / ||x|| (0 where ||x|| = 0), while
  F.normalize returns x / eps where 0 < ||x|| < eps.

Same axes and keepdims as the original reduction; every intermediate must be read only inside the pattern.
"""

from __future__ import annotations

import math

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.matching import (
    add_node,
    close,
    private,
    producer,
    reduce_axes,
    remove_dead,
    same_shape,
    scalar,
    sole_reader,
)
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses, redirect


def _count(red: Node) -> int | None:
    """How many elements a reduction node reduces into each output element (static shapes only)."""
    x = red.inputs[0]
    if x is None or x.shape is None:
        return None
    axes = reduce_axes(red, x.rank)
    if axes is None:
        return None
    dims = [x.shape[a] for a in axes]
    static = [d for d in dims if isinstance(d, int)]
    return math.prod(static) if len(static) == len(dims) else None


def _divided_by_count(node: Node, s: Value) -> bool:
    """node is s / N or s * (1/N) (either order for Mul), N the element count of s's ReduceSum."""
    red = producer(s, "ReduceSum")
    n = _count(red) if red is not None else None
    if n is None or n == 0 or not s.dtype.is_float:
        return False
    if node.op == "Div":
        return node.inputs[0] is s and close(scalar(node.inputs[1]), float(n), s.dtype)
    if node.op == "Mul":
        k = node.inputs[1] if node.inputs[0] is s else node.inputs[0]
        return k is not s and close(scalar(k), 1.0 / n, s.dtype)
    return False


def _mean(graph: Graph, node: Node, uses: Uses) -> str | None:
    for s in node.inputs[:2]:
        if s is not None and _divided_by_count(node, s) and private(uses, s, node):
            red = s.producer
            assert red is not None
            return _replace(graph, node, "ReduceMean", red, "mean")
    return None


def _square_base(v: Value | None) -> Value | None:
    p = producer(v, ("Pow", "Mul"))
    if p is None:
        return None
    if p.op == "Pow":
        return p.inputs[0] if scalar(p.inputs[1]) == 2.0 else None
    return p.inputs[0] if p.inputs[0] is p.inputs[1] else None


def _sum_square(graph: Graph, node: Node, uses: Uses) -> str | None:
    sq, s = node.inputs[0], node.outputs[0]
    base = _square_base(sq)
    if base is None or sq is None or not private(uses, sq, node):
        return None
    after = sole_reader(uses, s, ("Div", "Mul"))
    if after is not None and _divided_by_count(after, s):
        return None  # a mean of squares: the mean rule makes it a ReduceMean of sq(x)
    return _replace(graph, node, "ReduceSumSquare", node, "sum_square", x=base)


def _l2(graph: Graph, node: Node, uses: Uses) -> str | None:
    s = node.inputs[0]
    red = producer(s, "ReduceSumSquare")
    if red is None or s is None or not private(uses, s, node):
        return None
    if node.op == "Pow" and scalar(node.inputs[1]) != 0.5:
        return None
    return _replace(graph, node, "ReduceL2", red, "l2")


def _normalize_expand(graph: Graph, node: Node, uses: Uses) -> str | None:
    x, e = node.inputs[0], node.inputs[1]
    expand = producer(e, "Expand")
    clip = producer(expand.inputs[0], ("Clip", "Max")) if expand is not None else None
    l2 = producer(clip.inputs[0], "ReduceL2") if clip is not None else None
    if (expand is None or l2 is None or x is None or e is None or l2.inputs[0] is not x
            or not private(uses, e, node) or not same_shape(node.outputs[0].shape, x.shape)):
        return None
    node.inputs[1] = expand.inputs[0]
    remove_dead(graph, [expand])
    return "l2_normalize"


def _replace(graph: Graph, node: Node, op: str, red: Node, what: str, *, x: Value | None = None) -> str | None:
    """Replace `node` (the end of the chain) by `op` over `red`'s axes and keepdims, reading x (or red's input)."""
    src = x if x is not None else red.inputs[0]
    out = node.outputs[0]
    if src is None:
        return None
    attrs = {k: v for k, v in red.attrs.items() if k in ("keepdims", "noop_with_empty_axes")}
    (y,) = add_node(graph, node, op, [src, *red.inputs[1:2]], attrs, name=f"{node.name}/{op}")
    if y.type != out.type:
        graph.remove_nodes([n for n in (y.producer,) if n is not None])
        return None
    redirect(graph, out, y)
    remove_dead(graph, [node])
    return what


RULES = [
    rule(["Div", "Mul"], _mean),
    rule("ReduceSum", _sum_square),
    rule(["Sqrt", "Pow"], _l2),
    rule("Div", _normalize_expand),
]


def fuse_reductions(graph: Graph) -> PassResult:
    """Canonicalize reduction chains (counts: mean, sum_square, l2, l2_normalize)."""
    return apply_rules(graph, RULES)
