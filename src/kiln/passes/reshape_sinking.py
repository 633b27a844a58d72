"""Reshape sinking: a Reshape (or Flatten / Squeeze / Unsqueeze) between two elementwise ops moves below the second,
so that pointwise fusion puts both ops into one kernel; the Reshape, now at the end, stays a view. In every graph
(nested bodies included).

Rewrite case, for `e1 -> R -> e2` (R one of the reshapes; e1 and e2 elementwise in pointwise fusion's sense):
- e1's output is read by R alone, R's by e2 alone (neither is a graph output);
- R's input has a known shape, and e2's output has R's output shape (nothing else grows it); e2 is not an Expand
  (its shape operand is not a scalar to move);
- e2's other operands are absent or hold one element (scalars; a constant of rank > 0 is replaced by its rank-0
  copy, so it does not change the rank e2 computes in);
- then e2 runs on R's input and R reshapes e2's result into the value e2 made (its name and readers stay).
Repeated while it applies, so a Reshape moves down a whole chain. A BERT export's attention-mask preparation
(Cast, Reshape to [batch, 1, 1, seq], Where) is two kernels before and one after.
"""

from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.ops import const_value
from kiln.passes.manager import PassResult
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.pointwise_fusion import is_elementwise
from kiln.passes.rewrite import Uses, graphs

RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def sink_reshapes(graph: Graph) -> PassResult:
    counts: dict[str, int] = {}
    for g in graphs(graph):
        for k, v in apply_rules(g, [rule(RESHAPES, _sink)]).counts.items():
            counts[k] = counts.get(k, 0) + v
        g.toposort()  # moved nodes; the manager sorts the main graph only
    return PassResult.of(**counts)


def _shape(v: Value | None) -> tuple | None:
    return v.type.shape if v is not None and isinstance(v.type, TensorType) else None


def _scalar(v: Value) -> bool:
    """One element: rank 0, or a constant of any rank holding one value."""
    if not isinstance(v.type, TensorType) or v.type.shape is None:
        return False
    if v.type.rank == 0:
        return True
    c = const_value(v)
    return isinstance(c, torch.Tensor) and c.numel() == 1


def _sink(g: Graph, r: Node, uses: Uses) -> str | None:
    x, cur = r.inputs[0], r.outputs[0]
    if x is None or _shape(x) is None or x.producer is None or not is_elementwise(x.producer):
        return None
    if uses.only_reader(x) is not r or len(r.outputs) != 1:
        return None
    e = uses.only_reader(cur)
    if e is None or e.op == "Expand" or not is_elementwise(e) or sum(v is cur for v in e.inputs) != 1:
        return None
    if _shape(e.outputs[0]) != _shape(cur) or not all(v is None or v is cur or _scalar(v) for v in e.inputs):
        return None
    inputs: list[Value | None] = []
    for v in e.inputs:
        if v is cur:
            inputs.append(x)
        elif v is None or v.type.rank == 0:  # type: ignore[union-attr]
            inputs.append(v)
        else:
            c = const_value(v)
            assert isinstance(c, torch.Tensor)
            inputs.append(g.add_initializer(f"{v.name}.scalar", c.reshape(()), v.dtype))
    y = e.outputs[0]
    inner = Value(g.fresh_name(f"{y.name}.unreshaped"), TensorType(y.dtype, _shape(x)))
    inner.producer = e
    e.inputs, e.outputs = inputs, [inner]
    r.inputs, r.outputs = [inner, *r.inputs[1:]], [y]
    y.producer = r
    return "reshapes_sunk"
