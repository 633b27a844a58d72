"""Transpose sinking: a Transpose is moved down through elementwise ops until it meets another Transpose, and the
two become one (or none, when they cancel). Only done when they meet, so every rewrite removes a node and no
data movement is added; in every graph (nested bodies included).

Rewrite cases, for `T(x, p) -> e1 -> ... -> ek -> T(., q)` where each value on the path has one reader:
- each e is an elementwise op (unary: Relu, Cast, Exp, ...; broadcasting: Add, Mul, Where, Clip, PRelu, ...)
  whose output has the transposed input's shape (a broadcast that grows it would move more data);
- the other operands of each e are: absent, scalars (kept), constants (a permuted copy by the inverse of p,
  after padding their rank with leading 1s; large constants with other readers block the move, a copy would
  double them), or Transposes by the same p read only by e (dropped: e reads their input);
- then e1..ek run on x untransposed, and T(., q) o T(., p) becomes T(., p[q]) - or nothing when that is the
  identity (its readers read ek's output directly; not when that output is the model's output).
Adjacent pairs (k = 0) are merged the same way.
"""

from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.ops import const_value
from kiln.passes.manager import PassResult
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses, graphs, try_redirect

UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "Ceil", "Celu", "Cos", "Cosh",
    "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu",
    "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh",
    "Softplus", "Softsign", "Sqrt", "Swish", "Tan", "Tanh", "ThresholdedRelu",
})
BROADCASTING = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Equal", "Greater", "GreaterOrEqual",
    "Less", "LessOrEqual", "And", "Or", "Xor", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "PRelu",
    "Where", "Clip",
})
ELEMENTWISE = UNARY | BROADCASTING
MAX_PATH = 32
COPY_LIMIT = 1 << 12
"""A constant operand with other readers is copied (permuted) only up to this many elements."""


def sink_transposes(graph: Graph) -> PassResult:
    counts: dict[str, int] = {}
    for g in graphs(graph):
        for k, v in apply_rules(g, [rule("Transpose", _sink)]).counts.items():
            counts[k] = counts.get(k, 0) + v
        g.toposort()  # moved nodes; the manager sorts the main graph only
    return PassResult.of(**counts)


def perm_of(node: Node) -> list[int] | None:
    """A Transpose's permutation, normalized (None when the default one's rank is unknown)."""
    x = node.inputs[0]
    p = node.attrs["perm"]
    if p is None:
        rank = x.type.rank if x is not None and isinstance(x.type, TensorType) else None
        return None if rank is None else list(range(rank))[::-1]
    return [a + len(p) if a < 0 else a for a in p]


def _sink(g: Graph, t: Node, uses: Uses) -> str | None:
    perm = perm_of(t)
    if perm is None or t.inputs[0] is None:
        return None
    path = _path(t, perm, uses)
    if path is None:
        return None
    *ops, end = path
    for e in ops:
        _move_below(g, t, e, perm, uses)
    return _merge(g, t, end, perm)


def _path(t: Node, perm: list[int], uses: Uses) -> list[Node] | None:
    """The elementwise nodes from t to the next Transpose, and that Transpose; None when there is none."""
    path: list[Node] = []
    cur = t.outputs[0]
    for _ in range(MAX_PATH):
        r = uses.only_reader(cur)
        if r is None:
            return None
        if r.op == "Transpose":
            q = perm_of(r)
            return [*path, r] if q is not None and len(q) == len(perm) else None
        if r.op not in ELEMENTWISE or not _passable(r, cur, perm, uses):
            return None
        path.append(r)
        cur = r.outputs[0]
    return None


def _shape(v: Value | None) -> tuple | None:
    return v.type.shape if v is not None and isinstance(v.type, TensorType) else None


def _passable(e: Node, cur: Value, perm: list[int], uses: Uses) -> bool:
    if len(e.outputs) != 1 or sum(v is cur for v in e.inputs) != 1:
        return False
    if _shape(e.outputs[0]) != _shape(cur) or _shape(cur) is None:
        return False
    return all(v is None or v is cur or _operand(v, e, perm, uses) is not None for v in e.inputs)


def _operand(v: Value, e: Node, perm: list[int], uses: Uses) -> str | None:
    """How another operand of e moves with the Transpose: "scalar", "constant", "transposed", or None."""
    if not isinstance(v.type, TensorType) or v.type.rank is None or v.type.rank > len(perm):
        return None
    if v.type.rank == 0:
        return "scalar"
    c = const_value(v)
    if isinstance(c, torch.Tensor):
        return "constant" if uses.only_reader(v) is e or c.numel() <= COPY_LIMIT else None
    p = v.producer
    if p is not None and p.op == "Transpose" and perm_of(p) == perm and uses.only_reader(v) is e:
        return "transposed"
    return None


def _move_below(g: Graph, t: Node, e: Node, perm: list[int], uses: Uses) -> None:
    """T(x) -> e -> y  becomes  x -> e -> T -> y (e's other operands adjusted)."""
    cur, x = t.outputs[0], t.inputs[0]
    inverse = [perm.index(i) for i in range(len(perm))]
    inputs: list[Value | None] = []
    for v in e.inputs:
        kind = None if v is None or v is cur else _operand(v, e, perm, uses)
        if v is cur:
            inputs.append(x)
        elif v is None or kind == "scalar":
            inputs.append(v)
        elif kind == "constant":
            inputs.append(_permuted(g, v, inverse))
        else:  # "transposed"
            assert v.producer is not None
            inputs.append(v.producer.inputs[0])
            g.remove_nodes([v.producer])
    y = e.outputs[0]
    shape = _shape(y)
    assert shape is not None
    inner = Value(g.fresh_name(f"{y.name}.untransposed"), TensorType(y.dtype, tuple(shape[i] for i in inverse)))
    inner.producer = e
    e.inputs, e.outputs = inputs, [inner]
    t.inputs, t.outputs = [inner], [y]
    y.producer = t


def _permuted(g: Graph, v: Value, inverse: list[int]) -> Value:
    c = const_value(v)
    c = c.reshape((1,) * (len(inverse) - c.dim()) + tuple(c.shape))
    return g.add_initializer(f"{v.name}.transposed", c.permute(inverse).contiguous(), v.dtype)


def _merge(g: Graph, t: Node, end: Node, perm: list[int]) -> str:
    """t now feeds `end` directly: end o t becomes one Transpose, or none."""
    q = perm_of(end)
    assert q is not None
    combined = [perm[i] for i in q]
    src = t.inputs[0]
    assert src is not None
    end.inputs = [src]
    end.attrs = {**end.attrs, "perm": tuple(combined)}
    g.remove_nodes([t])
    if combined == sorted(combined) and try_redirect(g, end.outputs[0], src):
        g.remove_nodes([end])
        return "transposes_cancelled"
    return "transposes_merged"
