"""Softmax recognition: the decomposed softmax and log-softmax forms become `Softmax` / `LogSoftmax`.

Rewrite cases (sum = ReduceSum over one axis a with keepdims; z = x - ReduceMax(x, a, keepdims) or any z):
- e = Exp(z); e / sum(e)  or  e * Reciprocal(sum(e))                  -> Softmax(x, axis=a)
- z - Log(sum(Exp(z)))                                                 -> LogSoftmax(x, axis=a)
- x - ReduceLogSumExp(x, a, keepdims)                                  -> LogSoftmax(x, axis=a)
- Log(Softmax(x, a))                                                   -> LogSoftmax(x, axis=a)

Without the max subtraction the result is the same (the ops subtract the max themselves, so they only differ
where the decomposed form overflows). Every intermediate must be read only inside the pattern.
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.matching import add_node, keeps_dims, private, producer, reduce_axes, remove_dead
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses, redirect


def _one_axis(node: Node, v: Value) -> int | None:
    """The single axis a keepdims reduction of `v` reduces."""
    axes = reduce_axes(node, v.rank)
    return axes[0] if axes is not None and len(axes) == 1 and keeps_dims(node) else None


def _unshift(z: Value, axis: int, uses: Uses, *readers: Node) -> Value:
    """x when z = x - ReduceMax(x, axis, keepdims) and z is read only by `readers`; else z itself."""
    sub = producer(z, "Sub")
    mx = producer(sub.inputs[1], "ReduceMax") if sub is not None else None
    if (sub is None or mx is None or mx.inputs[0] is not sub.inputs[0] or not private(uses, z, *readers)
            or _one_axis(mx, z) != axis or not private(uses, mx.outputs[0], sub)):
        return z
    x = mx.inputs[0]
    return x if x is not None else z


def _sum_of(s: Value, reader: Node, uses: Uses) -> tuple[Node, int] | None:
    """s = ReduceSum(.) over one axis with keepdims, read only by `reader`."""
    red = producer(s, "ReduceSum")
    if red is None or red.inputs[0] is None or not private(uses, s, reader):
        return None
    axis = _one_axis(red, red.inputs[0])
    return None if axis is None else (red, axis)


def _softmax(graph: Graph, node: Node, uses: Uses) -> str | None:
    e, s = node.inputs[0], node.inputs[1]
    if node.op == "Mul":
        for a, b in ((e, s), (s, e)):
            rec = producer(b, "Reciprocal")
            if rec is not None and b is not None and private(uses, b, node):
                e, s, reader = a, rec.inputs[0], rec
                break
        else:
            return None
    else:
        reader = node
    exp = producer(e, "Exp")
    found = _sum_of(s, reader, uses) if s is not None else None
    if exp is None or found is None or found[0].inputs[0] is not e or e is None:
        return None
    red, axis = found
    if not private(uses, e, red, node) or exp.inputs[0] is None:
        return None
    x = _unshift(exp.inputs[0], axis, uses, exp)
    return _emit(graph, node, "Softmax", x, axis)


def _log_softmax(graph: Graph, node: Node, uses: Uses) -> str | None:
    z, t = node.inputs[0], node.inputs[1]
    if z is None or t is None:
        return None
    lse = producer(t, "ReduceLogSumExp")
    if lse is not None and lse.inputs[0] is z and private(uses, t, node):
        axis = _one_axis(lse, z)
        return None if axis is None else _emit(graph, node, "LogSoftmax", z, axis)
    log = producer(t, "Log")
    found = _sum_of(log.inputs[0], log, uses) if log is not None and log.inputs[0] is not None else None
    if log is None or found is None or not private(uses, t, node):
        return None
    red, axis = found
    exp = producer(red.inputs[0], "Exp")
    if exp is None or exp.inputs[0] is not z or not private(uses, exp.outputs[0], red):
        return None
    x = _unshift(z, axis, uses, exp, node)
    return _emit(graph, node, "LogSoftmax", x, axis)


def _log_of_softmax(graph: Graph, node: Node, uses: Uses) -> str | None:
    sm = producer(node.inputs[0], "Softmax")
    if sm is None or sm.inputs[0] is None or not private(uses, sm.outputs[0], node):
        return None
    return _emit(graph, node, "LogSoftmax", sm.inputs[0], sm.attrs["axis"])


def _emit(graph: Graph, node: Node, op: str, x: Value, axis: int) -> str | None:
    out = node.outputs[0]
    if x.type != out.type or x.rank is None or not x.dtype.is_float:
        return None
    (y,) = add_node(graph, node, op, [x], {"axis": axis - x.rank if axis >= 0 else axis}, name=f"{node.name}/{op}")
    redirect(graph, out, y)
    remove_dead(graph, [node])
    return "softmax" if op == "Softmax" else "log_softmax"


RULES = [
    rule(["Div", "Mul"], _softmax),
    rule("Sub", _log_softmax),
    rule("Log", _log_of_softmax),
]


def fuse_softmax(graph: Graph) -> PassResult:
    """Replace decomposed (log-)softmaxes (counts: softmax, log_softmax)."""
    return apply_rules(graph, RULES)
