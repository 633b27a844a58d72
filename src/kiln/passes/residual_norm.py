"""Residual into the norm: the residual Add that a LayerNorm/RMSNorm normalizes becomes the first step of the norm's
kernel (a Fused node of kind "residual_norm": body Add(a, r) -> s, Norm(s, scale[, B]) -> Y). The norm kernel
reads a and r, adds them (rounding the sum to its type, as the Add does) and normalizes the sum; it writes s too
when something else reads it (a pre-LN model's residual stream).

Why: after a GEMM that cuBLAS runs, the residual is a kernel of its own (cuBLAS's epilogues take a bias and an
activation, not a second full-size tensor): BERT-base's FFN-down, its residual add and its LayerNorm were three
kernels a layer; now two. Where a GEMM template took the residual in its epilogue, a post-LN sum (read by the norm
alone) moves the same bytes either way (the GEMM writes its result instead of the sum, the norm reads a and r
instead of s); a pre-LN sum costs the norm one more read. Measured on an H100 (2026-11-27, FP16, each beside
reduce-overhead in its own process): BERT-base bs1 0.439 -> 0.430 ms; ViT-B/16 with its pre-LN sums moved too
against the post-LN rule alone: bs1 0.497 -> 0.483 ms, bs128 11.30 -> 11.17 ms. So every such sum moves, without
timing; the tuner then times the GEMM without the residual (cuBLAS's epilogue may now take all of it).

Rewrite cases:
- Fused[epilogue](anchor, steps..., Add(acc, r)) -> s; Norm(s) -> Y
  => Fused[epilogue](anchor, steps...) -> t; Fused[residual_norm](t, r, scale[, B]) -> [s,] Y
  (an epilogue left with its anchor alone becomes the bare anchor);
- Add(a, r) -> s (bare, or the one node of a Fused[pointwise]); Norm(s) -> Y  =>  Fused[residual_norm](a, r, ...).
The node outputs [Y] when the norm alone read s, else [s, Y] (s keeps its name and readers).

Conditions: what the norm kernels take (float32 statistics; a static normalized shape, the scale and B of exactly
that shape), the norm's statistics outputs unread, s its input X only; a, r and s of one float type and one shape
(no broadcast); in an epilogue, the Add is the last step, its one output the node's only output, and its operand r
comes from outside the body.

Order: in the late list (`kiln.passes.pipeline.LATE`), after the epilogues are final (`extend_epilogues`) and
before `fuse_norm_gemm`, which then leaves these norms unfused (their kernel is the residual norm's). GPU builds.
"""

from __future__ import annotations

from typing import Any

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.rewrite import BodyInputs, Uses

NORMS = frozenset({"LayerNormalization", "RMSNormalization"})


def fuse_residual_norm(graph: Graph) -> PassResult:
    counts: dict[str, int] = {}
    uses = Uses.of(graph)
    for norm in [n for n in graph.nodes if n.op in NORMS]:
        s = norm.inputs[0]
        if s is None or not _norm_ok(norm, uses) or s.producer is None or s in norm.inputs[1:]:
            continue
        keep = uses.only_reader(s) is not norm
        found = _split_sum(graph, s.producer, s)
        if found is None:
            continue
        a, r, add, kind = found
        node = _residual_norm(graph, norm, a, r, add, keep)
        if keep:
            kind += "_kept"
        at = graph.nodes.index(norm)
        graph.remove_nodes([norm])
        graph.insert_node(node, at)
        counts[kind] = counts.get(kind, 0) + 1
        uses = Uses.of(graph)
    return PassResult(bool(counts), counts)


def _norm_ok(norm: Node, uses: Uses) -> bool:
    """What the norm kernels take (else the moved Add would run unfused): float32 statistics, a static normalized
    shape, scale (and B) of exactly that shape give or take leading 1s; and the statistics outputs unread."""
    s, y = norm.inputs[0], norm.outputs[0]
    if s is None or not s.is_tensor or not s.dtype.is_float or not y.dtype.is_float or s.shape is None:
        return False
    rank, axis = len(s.shape), int(norm.attrs["axis"])
    axis = axis + rank if axis < 0 else axis
    normalized = _squeezed(s.shape[axis:]) if 0 <= axis < rank else None
    if norm.attrs["stash_type"] is not DType.FLOAT32 or normalized is None or \
            not all(isinstance(d, int) for d in normalized):
        return False
    for v in norm.inputs[1:]:
        if v is not None and (v.shape is None or _squeezed(v.shape) != normalized):
            return False
    return not any(uses.readers.get(o) or o in uses.outputs for o in norm.outputs[1:])


def _squeezed(dims: tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    """dims without their leading 1s."""
    i = 0
    while i < len(dims) and dims[i] == 1:
        i += 1
    return tuple(dims[i:])


def _same(s: Value, *vs: Value | None) -> bool:
    """Every v is a tensor of s's type (dtype and shape, known): the Add neither broadcasts nor casts."""
    return s.shape is not None and all(v is not None and v.is_tensor and v.type == s.type for v in vs)


def _split_sum(graph: Graph, p: Node, s: Value) -> tuple[Value, Value, Node, str] | None:
    """(a, r, the Add as a node over outer values, which case) for the sum s made by p, p rewritten to make a
    instead of s (or removed, when p was the Add alone); None (p untouched) when s is not such a sum."""
    if p.op == "Add" and len(p.inputs) == 2 and _same(s, *p.inputs):
        graph.remove_nodes([p])
        a, r = p.inputs
        assert a is not None and r is not None
        return a, r, p, "after_add"
    if p.op != "Fused" or len(p.outputs) != 1:
        return None
    body: Graph = p.attrs["body"]
    kind = p.attrs["kind"]
    if kind == "pointwise" and len(body.nodes) == 1 and body.nodes[0].op == "Add" and body.outputs == \
            body.nodes[0].outputs:
        outer = dict(zip(body.inputs, p.inputs))
        add = body.nodes[0]
        a, r = (outer.get(v) if v is not None else None for v in add.inputs)
        if len(add.inputs) != 2 or a is None or r is None or not _same(s, a, r):
            return None
        graph.remove_nodes([p])
        return a, r, Node("Add", [a, r], [s], dict(add.attrs), add.name), "after_add"
    if kind != "epilogue" or len(body.nodes) < 2 or body.nodes[-1].op != "Add":
        return None
    add = body.nodes[-1]
    if body.outputs != add.outputs or len(add.inputs) != 2:
        return None
    made = {o for m in body.nodes[:-1] for o in m.outputs}
    inside = [v for v in add.inputs if v in made]
    outside = [v for v in add.inputs if v is not None and v not in made]
    if len(inside) != 1 or len(outside) != 1 or outside[0] not in body.inputs:
        return None
    acc, r_in = inside[0], outside[0]
    r = p.inputs[body.inputs.index(r_in)]
    if not _same(s, acc, r):
        return None
    t = Value(graph.fresh_name(f"{s.name}.addend"), acc.type)
    order = [t if v is acc else r for v in add.inputs]
    body.nodes = body.nodes[:-1]
    body.outputs = [acc]
    if not any(r_in in m.inputs for m in body.nodes):  # r only fed the Add: no longer a body input
        k = body.inputs.index(r_in)
        body.inputs = body.inputs[:k] + body.inputs[k + 1:]
        p.inputs = p.inputs[:k] + p.inputs[k + 1:]
    if len(body.nodes) == 1:  # the anchor alone: a bare node again
        anchor = body.nodes[0]
        outer = dict(zip(body.inputs, p.inputs))
        bare = Node(anchor.op, [outer.get(v, v) if v is not None else None for v in anchor.inputs], [t],
                    dict(anchor.attrs), anchor.name)
        at = graph.nodes.index(p)
        graph.remove_nodes([p])
        graph.insert_node(bare, at)
    else:
        p.outputs = [t]
        t.producer = p
    a, b = order
    assert a is not None and b is not None
    return a, b, Node("Add", [a, b], [s], dict(add.attrs), add.name), "after_epilogue"


def _residual_norm(graph: Graph, norm: Node, a: Value, r: Value, add: Node, keep: bool) -> Node:
    """The Fused[residual_norm] node: Add(a, r) -> s, then the norm of s, making the norm's Y (and s first, when
    `keep`)."""
    made = BodyInputs(graph)
    s, y = norm.inputs[0], norm.outputs[0]
    assert s is not None
    s_in = Value(graph.fresh_name(f"{s.name}.inner"), s.type)
    y_in = Value(graph.fresh_name(f"{y.name}.inner"), y.type)
    first = Node("Add", [made.take(v) for v in add.inputs], [s_in], dict(add.attrs), add.name)
    second = Node(norm.op, [s_in, *(made.take(v) for v in norm.inputs[1:])], [y_in], dict(norm.attrs), norm.name)
    body = Graph(f"{add.name} + {norm.name}", parent=graph)
    body.nodes = [first, second]
    body.inputs = made.inputs
    body.outputs = [s_in, y_in] if keep else [y_in]
    for m in body.nodes:
        for o in m.outputs:
            o.producer = m
    outs = [s, y] if keep else [y]
    node = Node("Fused", made.outer, outs, {"body": body, "kind": "residual_norm"}, graph.fresh_name(body.name))
    for o in outs:
        o.producer = node
    return node
