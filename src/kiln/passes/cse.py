"""Common-subexpression elimination: nodes that compute the same thing become one, and so do equal constants.
In every graph (nested bodies included), each graph on its own.

Rewrite cases:
- initializers with the same dtype (kiln's: int4 and int8 differ), shape and bytes become one (the first);
- nodes with the same op, the same attributes and the same inputs (after the merges above them) become one,
  in one sweep in topological order, so whole duplicated chains (three `Shape(x) -> Gather(1)` copies) fold
  into one. Attributes compare by value: tensors by dtype, shape and bytes, string arrays by their elements,
  lists element-wise;
- integer scalars and vectors computed from shapes (Shape, Gather, Concat, ... as `shape_values` follows them)
  whose values are equal as symbolic dims, whatever tensors they read: `Gather(Shape(input_ids), 1)` and
  `Gather(Shape(hidden), 1)` are both `seq`.

Never merged:
- random ops (RandomUniform*, RandomNormal*, Multinomial, Bernoulli, Dropout): two draws differ;
- nodes with subgraphs (If, Loop, Scan, Fused): bodies are not compared;
- a value that is an output of its graph, when the value replacing it cannot take its name (`can_redirect`).
Weights merged here are read by several nodes: a later pass that rewrites a weight must make a new
initializer, not change a shared one in place.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.ops.tensor import shape_values
from kiln.passes.constant_folding import RANDOM, VALUE_OPS
from kiln.passes.manager import PassResult
from kiln.passes.rewrite import can_redirect, graphs, try_redirect


def eliminate_common_subexpressions(graph: Graph) -> PassResult:
    weights = nodes = 0
    for g in graphs(graph):
        alias: dict[Value, Value] = {}
        weights += _merge_initializers(g, alias)
        nodes += _merge_nodes(g, alias)
        _substitute(g, alias)
    return PassResult.of(weights_merged=weights, nodes_merged=nodes)


def digest(t: torch.Tensor) -> bytes:
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().reshape(-1))  # dense, whatever t's strides
    raw = flat.view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).digest()


def attr_key(v: Any) -> Any:
    """A hashable stand-in for an attribute value that compares by value."""
    if isinstance(v, torch.Tensor):
        return ("tensor", str(v.dtype), tuple(v.shape), digest(v))
    if isinstance(v, np.ndarray):
        return ("array", str(v.dtype), v.shape, tuple(v.reshape(-1).tolist()))
    if isinstance(v, (list, tuple)):
        return tuple(attr_key(x) for x in v)
    if isinstance(v, Graph):
        return ("graph", id(v))
    return v


def _merge(g: Graph, old: Value, new: Value, alias: dict[Value, Value]) -> None:
    if old in g.outputs:
        try_redirect(g, old, new)
    else:
        alias[old] = new


def _merge_initializers(g: Graph, alias: dict[Value, Value]) -> int:
    inputs = set(g.inputs)
    buckets: dict[Any, list[Value]] = {}
    for v in g.initializers.values():
        if v not in inputs:
            buckets.setdefault((v.type, _prefix(v.data)), []).append(v)
    dropped: list[Value] = []
    for bucket in buckets.values():
        seen: dict[Any, Value] = {}
        for v in bucket if len(bucket) > 1 else ():  # only candidates pay for hashing all their bytes
            first = seen.setdefault(attr_key(v.data), v)
            if first is not v and can_redirect(g, v, first):
                _merge(g, v, first, alias)
                dropped.append(v)
    for v in dropped:
        del g.initializers[v.name]
    return len(dropped)


def _prefix(data: Any) -> Any:
    """A cheap first look at a constant: its first elements."""
    if isinstance(data, torch.Tensor):
        return attr_key(data.reshape(-1)[:16])
    return attr_key(data)


def _merge_nodes(g: Graph, alias: dict[Value, Value]) -> int:
    seen: dict[Any, Node] = {}
    dropped: list[Node] = []
    for n in g.nodes:
        if n.op in RANDOM or n.subgraphs():
            continue
        key = _shape_key(n) or _node_key(n, alias)
        first = seen.setdefault(key, n)
        if first is n or not all(can_redirect(g, a, b) for a, b in zip(n.outputs, first.outputs)):
            continue
        for a, b in zip(n.outputs, first.outputs):
            _merge(g, a, b, alias)
        dropped.append(n)
    g.remove_nodes(dropped)
    return len(dropped)


def _node_key(n: Node, alias: dict[Value, Value]) -> Any:
    ins = tuple(None if v is None else id(alias.get(v, v)) for v in n.inputs)
    return (n.op, ins, len(n.outputs), tuple(sorted((k, attr_key(a)) for k, a in n.attrs.items())))


def _shape_key(n: Node) -> Any:
    """For an integer scalar or vector computed from shapes: its value as symbolic dims (two values equal as
    expressions are equal at run time, whichever tensors' shapes they were read from)."""
    if n.op not in VALUE_OPS or len(n.outputs) != 1:
        return None
    t = n.outputs[0].type
    if not isinstance(t, TensorType) or not t.dtype.is_int or t.rank not in (0, 1):
        return None
    vals = shape_values(n.outputs[0])
    return None if vals is None else ("shape value", t.dtype, t.rank, tuple(vals))


def _substitute(g: Graph, alias: dict[Value, Value]) -> None:
    """Readers of each aliased value read its replacement: node inputs here and in nested bodies, and the
    outputs of nested bodies (a branch may return an outer value as is)."""
    if not alias:
        return
    for n in g.nodes:
        n.inputs = [None if v is None else alias.get(v, v) for v in n.inputs]
        if n.op != "Fused":
            for sub in n.subgraphs():
                sub.outputs = [alias.get(v, v) for v in sub.outputs]
                _substitute(sub, alias)
