"""Helpers the pattern passes share: reading constants (through Identity and small shape-arithmetic chains),
walking single-reader chains, comparing dims, adding a node in place and dropping what a rewrite left dead."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Shape, Value
from kiln.ir.ops import get_op
from kiln.ir.ops.base import RefCtx, const_value
from kiln.ir.ops.tensor import shape_values
from kiln.passes.rewrite import Uses, redirect

_EVAL_OPS = frozenset({"Cast", "Sqrt", "Div", "Mul", "Add", "Sub", "Reciprocal", "Pow", "Neg", "Identity",
                       "Squeeze", "Unsqueeze", "Reshape", "Expand"})
_MAX_DEPTH = 8


def producer(v: Value | None, ops: str | Iterable[str]) -> Node | None:
    """The node that produces `v`, when it is one of `ops`."""
    if v is None or v.producer is None:
        return None
    p = v.producer
    return p if (p.op == ops if isinstance(ops, str) else p.op in ops) else None


def const(v: Value | None) -> torch.Tensor | None:
    """A constant tensor: an initializer, a Constant, a value folded at import, through Identity chains."""
    for _ in range(_MAX_DEPTH):
        if v is None:
            return None
        c = const_value(v)
        if isinstance(c, torch.Tensor):
            return c
        p = producer(v, "Identity")
        if p is None:
            return None
        v = p.inputs[0]
    return None


def small_value(v: Value | None, depth: int = 0) -> torch.Tensor | None:
    """The value of a small tensor computable now: constants, shape values (Shape -> Gather -> ...), and
    elementwise arithmetic on those (the 1/sqrt(head_size) an exporter computes from a Shape)."""
    if v is None or depth > _MAX_DEPTH or not v.is_tensor:
        return None
    c = const(v)
    if c is not None:
        return c
    dims = [d for d in v.shape or () if isinstance(d, int)]
    if v.shape is None or len(dims) != len(v.shape) or math.prod(dims) > 64:
        return None
    if v.dtype.is_int:
        values = shape_values(v)
        if values is not None and all(isinstance(d, int) for d in values) and v.rank in (0, 1):
            t = torch.tensor(values, dtype=v.dtype.torch)
            return t.reshape(()) if v.rank == 0 else t
    p = v.producer
    if p is None or p.op not in _EVAL_OPS or len(p.outputs) != 1:
        return None
    args = [small_value(x, depth + 1) if x is not None else None for x in p.inputs]
    if any(a is None and x is not None for a, x in zip(args, p.inputs)):
        return None
    if any(a is not None and a.numel() > 64 for a in args):
        return None
    try:
        out = get_op(p.op).ref(RefCtx(p), args)[0]
    except Exception:  # not evaluable now (a bad shape): the pattern just does not match
        return None
    return out if isinstance(out, torch.Tensor) else None


def scalar(v: Value | None) -> float | None:
    """The value of a one-element float constant (or small computable value), as a Python float."""
    if v is None or not v.is_tensor or not v.dtype.is_float:
        return None
    c = small_value(v)
    if c is None or c.numel() != 1:
        return None
    return float(c.reshape(()).item())


def close(got: float | None, want: float, dtype: DType) -> bool:
    """`got` is `want` as the graph's dtype holds it (a few units in the last place)."""
    if got is None:
        return False
    eps = torch.finfo(dtype.torch).eps if dtype.is_float else 0.0
    return abs(got - want) <= 4 * eps * max(abs(want), 1e-30)


def other(node: Node, v: Value) -> Value | None:
    """The other input of a binary node, one of whose inputs is `v` (None when both are `v`)."""
    a, b = node.inputs[0], node.inputs[1]
    if a is v and b is not v:
        return b
    if b is v and a is not v:
        return a
    return None


def readers(uses: Uses, v: Value) -> list[Node]:
    """The distinct nodes reading `v` (a node reading it twice counts once)."""
    out: list[Node] = []
    for n in uses.readers.get(v, []):
        if not any(n is m for m in out):
            out.append(n)
    return out


def private(uses: Uses, v: Value, *allowed: Node) -> bool:
    """`v` is read by no node outside `allowed` and is not a graph output."""
    if v in uses.outputs:
        return False
    return all(any(n is a for a in allowed) for n in uses.readers.get(v, []))


def sole_reader(uses: Uses, v: Value, ops: str | Iterable[str]) -> Node | None:
    """The only node reading `v` (possibly on several inputs), when it is one of `ops` and `v` is no output."""
    rs = readers(uses, v)
    if len(rs) != 1 or v in uses.outputs:
        return None
    n = rs[0]
    return n if (n.op == ops if isinstance(ops, str) else n.op in ops) else None


def same_dim(a: sym.Dim, b: sym.Dim) -> bool:
    return a == b or sym.equal(a, b) is True


def same_shape(a: Shape | None, b: Shape | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same_dim(x, y) for x, y in zip(a, b))


def reduce_axes(node: Node, rank: int | None) -> list[int] | None:
    """The sorted, normalized axes a Reduce* node reduces (None when unknown, absent or a no-op)."""
    if rank is None:
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        c = small_value(node.inputs[1])
        if c is None:
            return None
        axes = [int(a) for a in c.reshape(-1).tolist()]
    elif "axes" in node.attrs and node.attrs["axes"] is not None:
        axes = list(node.attrs["axes"])
    else:
        axes = []
    if not axes:
        return None if node.attrs.get("noop_with_empty_axes", 0) else list(range(rank))
    norm = sorted({a + rank if a < 0 else a for a in axes})
    return norm if len(norm) == len(axes) and all(0 <= a < rank for a in norm) else None


def keeps_dims(node: Node) -> bool:
    return bool(node.attrs.get("keepdims", 1))


def trailing(axes: Sequence[int] | None, rank: int | None) -> int | None:
    """The first axis when `axes` are the last len(axes) axes of a rank-`rank` tensor, else None."""
    if axes is None or rank is None or not axes:
        return None
    first = rank - len(axes)
    return first if list(axes) == list(range(first, rank)) else None


def add_node(graph: Graph, before: Node, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None,
             *, outputs: int = 1, name: str | None = None) -> list[Value]:
    """Add a node just before `before` (its inputs are already computed there); returns its outputs."""
    outs = graph.add(op, inputs, attrs, outputs=outputs, name=graph.fresh_name(name or f"{before.name}/{op}"))
    node = graph.nodes.pop()
    graph.nodes.insert(_index(graph, before), node)
    return outs


def _index(graph: Graph, node: Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    raise ValueError(f"node {node.name} is not in graph {graph.name}")


def add_const(graph: Graph, hint: str, data: torch.Tensor) -> Value:
    return graph.add_initializer(graph.fresh_name(hint), data)


def remove_dead(graph: Graph, roots: Iterable[Node]) -> int:
    """Remove the nodes of `roots` (and, recursively, their producers) that nothing reads any more, and
    initializers only they read. Returns how many nodes went."""
    uses = Uses.of(graph)
    count: dict[Value, int] = {v: len(rs) for v, rs in uses.readers.items()}
    dead: set[int] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if id(n) in dead or n.subgraphs():
            continue
        if any(count.get(v, 0) or v in uses.outputs for v in n.outputs):
            continue
        dead.add(id(n))
        for v in n.inputs:
            if v is None:
                continue
            count[v] = count.get(v, 1) - 1
            if v.producer is not None and count[v] == 0:
                stack.append(v.producer)
            elif v.producer is None and count[v] == 0 and graph.initializers.get(v.name) is v:
                del graph.initializers[v.name]
    graph.remove_nodes([n for n in graph.nodes if id(n) in dead])
    return len(dead)


def split_heads(r: Value | None) -> tuple[Value, sym.Dim] | None:
    """(x, H) when r = Reshape(x [B, S, E], [B, S, H, D]) with E = H * D: an attention's head split (before the
    Transpose to [B, H, S, D])."""
    reshape = producer(r, "Reshape")
    x = reshape.inputs[0] if reshape is not None else None
    if r is None or r.shape is None or len(r.shape) != 4 or x is None or x.shape is None or len(x.shape) != 3:
        return None
    b, s, h, d = r.shape
    if not (same_dim(b, x.shape[0]) and same_dim(s, x.shape[1]) and same_dim(sym.mul(h, d), x.shape[2])):
        return None
    return x, h


def swap_in(graph: Graph, node: Node, y: Value, what: str, replaced: Iterable[Node] = ()) -> str | None:
    """`y` (just built) takes the place of `node`'s one output when their types agree: its readers move to `y`, and
    `node` and `replaced` go where nothing reads them any more; returns `what`. Otherwise the new nodes making `y`
    are dropped and None returned (a rewrite never changes a value's type)."""
    if y.type != node.outputs[0].type:
        remove_dead(graph, [y.producer] if y.producer is not None else [])
        return None
    redirect(graph, node.outputs[0], y)
    remove_dead(graph, [node, *replaced])
    return what


def finalize(graph: Graph, replaced: list[Node]) -> None:
    """After a sweep of rewrites: drop what they left dead and restore topological order."""
    if replaced:
        remove_dead(graph, replaced)
        graph.toposort()


def is_float(v: Value | None) -> bool:
    return v is not None and v.is_tensor and v.dtype.is_float


def inv(x: float) -> float:
    return math.inf if x == 0 else 1.0 / x
