"""Value types for the passes: specializing symbols that are static in every build profile, and refining types
by inferring nodes again once their inputs are better known (after folding, specializing, inlining)."""

from __future__ import annotations

from collections.abc import Mapping

from kiln.ir import symbolic as sym
from kiln.ir.graph import Graph, TensorType, Value, ValueType
from kiln.ir.ops.base import infer_node
from kiln.passes.rewrite import graphs

Dims = Mapping[str, int]
"""Static symbols and their sizes (`PassContext.static_dims`)."""


def substitute(d: sym.Dim, dims: Dims) -> sym.Dim:
    """`d` with the static symbols replaced by their sizes."""
    if isinstance(d, int) or not dims:
        return d
    if d in dims:
        return dims[d]
    names = sym.symbols(d)
    if not names & dims.keys():
        return d
    e = sym._to_sym(d)
    return sym._from_sym(e.subs({s: dims[str(s)] for s in e.free_symbols if str(s) in dims}))


def _subst_type(t: ValueType, dims: Dims) -> ValueType:
    if not isinstance(t, TensorType) or t.shape is None:
        return t
    return TensorType(t.dtype, tuple(substitute(d, dims) for d in t.shape))


def specialize(graph: Graph, dims: Dims, fused_bodies: bool = False) -> int:
    """Substitute the static symbols in every value's type but the model's inputs and outputs (with
    `fused_bodies`, in the bodies of Fused nodes too)."""
    if not dims:
        return 0
    keep = {*graph.inputs, *graph.outputs}
    count = 0
    for g in _with_bodies(graph) if fused_bodies else graphs(graph):
        values = [*g.inputs, *(v for n in g.nodes for v in n.outputs)]
        for v in values:
            if v in keep:
                continue
            t = _subst_type(v.type, dims)
            if t != v.type:
                v.type = t
                count += 1
    return count


def _with_bodies(graph: Graph) -> list[Graph]:
    out = []
    for g in graphs(graph):
        out.append(g)
        for n in g.nodes:
            body = n.attrs.get("body") if n.op == "Fused" else None
            if isinstance(body, Graph):
                out.extend(_with_bodies(body))
    return out


def refine_types(graph: Graph) -> int:
    """Infer every node's types again, in order (a node's bodies before the node: an If's type comes from its
    branches); a dim or rank inference now knows statically replaces what the value had."""
    return _refine(graph, set(graph.outputs))


def _refine(g: Graph, keep: set[Value]) -> int:
    count = 0
    for node in g.nodes:
        if node.op != "Fused":
            count += sum(_refine(sub, keep) for sub in node.subgraphs())
        try:
            types = infer_node(node, g, len(node.outputs))
        except Exception:  # keeps its types: e.g. a branch never taken that the profile's shapes would fail
            continue
        for v, t in zip(node.outputs, types):
            better = _sharper(v.type, t)
            if better is not None and v not in keep:
                v.type = better
                count += 1
    return count


def _sharper(old: ValueType, new: ValueType) -> TensorType | None:
    """`old` with what `new` knows and `old` does not; None when that is nothing."""
    if not isinstance(old, TensorType) or not isinstance(new, TensorType) or old.dtype != new.dtype:
        return None
    if new.shape is None:
        return None
    if old.shape is None:
        return new
    if len(old.shape) != len(new.shape):
        return None
    shape = tuple(n if isinstance(n, int) and not isinstance(o, int) else o for o, n in zip(old.shape, new.shape))
    return TensorType(old.dtype, shape) if shape != old.shape else None
