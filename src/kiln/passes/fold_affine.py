"""Per-channel affine ops folded into the weights of the linear op before them.

The anchor is a Conv, ConvTranspose, Gemm, or a MatMul with a constant B; its weights (and bias, when it has one)
are constants and its output has no reader but the op folded into it. Along the anchor's output-channel axis
(axis 1 for convolutions, the last axis for Gemm/MatMul), with per-channel factors s and offsets t:

- BatchNormalization (inference form) after the anchor: s = scale / sqrt(var + eps), t = B - mean * s
  (its channel axis is 1, so after a MatMul only a 2-D output qualifies);
- Mul(anchor, c) / Mul(c, anchor) / Div(anchor, c): s = c (or 1 / c), t = 0;
- Add(anchor, c) / Add(c, anchor) / Sub(anchor, c): s = 1, t = c (or -c);

where c is a constant that broadcasts along the output-channel axis only (a scalar, [M], [M,1,1], [1,M,1,1] ...
for a convolution; [N], [1,N] ... for Gemm/MatMul) and has no more axes than the anchor's output.
The rewrite: W' = W * s per output channel (a ConvTranspose weight is [C, M/group, k...]: channel g*M/group + j
is column j of group g; Gemm's B is [K,N], or [N,K] with transB), bias' = bias * s + t (Gemm: C' = beta*C*s + t
and beta = 1). A MatMul has no bias input: its offset becomes Add(MatMul, t), the linear-with-bias form that the
epilogue pass fuses. A scale-only fold needs no bias. Arithmetic is float64; the new weights are new initializers
in the original dtype (the old ones are left to dead-node elimination).

A BatchNormalization that follows no anchor becomes Mul + Add by per-channel constants (of X's dtype), which
pointwise fusion can then merge with its neighbours.
"""

from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops.base import const_value
from kiln.passes.manager import PassResult
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses, graphs, redirect

ANCHORS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def fold_affine(graph: Graph) -> PassResult:
    counts: dict[str, int] = {}
    for g in graphs(graph):
        for k, v in apply_rules(g, RULES).counts.items():
            counts[k] = counts.get(k, 0) + v
    return PassResult(bool(counts), counts)


# --- what folds ------------------------------------------------------------------------------------------


def _const(v: Value | None) -> torch.Tensor | None:
    c = const_value(v)
    return c if isinstance(c, torch.Tensor) and c.is_floating_point() else None


def _anchor(v: Value, uses: Uses, reader: Node) -> Node | None:
    """The anchor producing `v` when `reader` is its only reader and its weights are constant."""
    a = v.producer
    if a is None or a.op not in ANCHORS or uses.only_reader(v) is not reader or a.outputs[0] is not v:
        return None
    if _const(a.inputs[1]) is None or (len(a.inputs) > 2 and a.inputs[2] is not None and _const(a.inputs[2]) is None):
        return None
    if a.op == "MatMul" and (v.rank is None or v.rank < 2 or a.inputs[1] is None or (a.inputs[1].rank or 0) < 2):
        return None
    return a if v.rank is not None else None


def _channels(a: Node) -> tuple[int, int]:
    """(output-channel axis of the anchor's output, number of channels)."""
    out = a.outputs[0]
    w = _const(a.inputs[1])
    assert w is not None and out.rank is not None
    if a.op == "Conv":
        return 1, w.shape[0]
    if a.op == "ConvTranspose":
        return 1, w.shape[1] * a.attrs["group"]
    if a.op == "Gemm":
        return 1, w.shape[0] if a.attrs["transB"] else w.shape[1]
    return out.rank - 1, w.shape[-1]


def _per_channel(c: torch.Tensor, rank: int, axis: int, m: int) -> torch.Tensor | None:
    """c as an [m] float64 vector when it broadcasts along `axis` of a rank-`rank` tensor only, else None."""
    if c.dim() > rank:
        return None
    shape = [1] * (rank - c.dim()) + list(c.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, m):
        return None
    return c.double().reshape(-1).expand(m).clone()


# --- the rewrite ----------------------------------------------------------------------------------------


def _scale_weight(a: Node, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    w64 = w.double()
    if a.op == "Conv":
        return w64 * s.reshape(-1, *[1] * (w.dim() - 1))
    if a.op == "ConvTranspose":
        g = a.attrs["group"]
        grouped = w64.reshape(g, w.shape[0] // g, *w.shape[1:])
        return (grouped * s.reshape(g, 1, -1, *[1] * (w.dim() - 2))).reshape(w.shape)
    if a.op == "Gemm" and a.attrs["transB"]:
        return w64 * s.reshape(-1, 1)
    return w64 * s  # [K, N] (or batched [..., K, N]): the channel is the last axis


def _fold(graph: Graph, a: Node, reader: Node, s: torch.Tensor, t: torch.Tensor | None) -> None:
    """Make the anchor compute reader's output (per-channel scale s, then offset t) and drop the reader."""
    w = _const(a.inputs[1])
    assert w is not None
    bias = _new_bias(a, s, t)
    inputs = a.inputs[:2]
    inputs[1] = graph.add_initializer(f"{a.name}.w_folded", _scale_weight(a, w, s).to(w.dtype))
    if bias is not None and a.op != "MatMul":
        inputs.append(graph.add_initializer(f"{a.name}.b_folded", bias.to(w.dtype)))
    a.inputs = inputs
    out = reader.outputs[0]
    graph.remove_nodes([reader])
    if bias is not None and a.op == "MatMul":  # no bias input: the linear-with-bias form MatMul -> Add
        b = graph.add_initializer(f"{a.name}.bias", bias.to(w.dtype))
        (y,) = graph.add("Add", [a.outputs[0], b], name=graph.fresh_name(f"{a.name}.bias_add"))
        graph.nodes.insert(graph.nodes.index(a) + 1, graph.nodes.pop())
        redirect(graph, out, y)
    else:
        redirect(graph, out, a.outputs[0])


def _new_bias(a: Node, s: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
    """bias * s + t (float64), or None when the folded op needs no bias."""
    b = _const(a.inputs[2]) if len(a.inputs) > 2 else None
    if a.op == "Gemm":  # C' = beta * C * s + t, then beta = 1 (C may be a scalar, [N], [1,N], [M,1] or [M,N])
        b = None if b is None or a.attrs["beta"] == 0 else b.double() * a.attrs["beta"]
        a.attrs["beta"] = 1.0
        scaled = None if b is None else b * s.reshape([1] * (max(b.dim(), 1) - 1) + [-1])
    else:
        scaled = None if b is None else b.double() * s
    if scaled is None:
        return t
    return scaled if t is None else scaled + t


def _batchnorm(graph: Graph, n: Node, uses: Uses) -> str | None:
    if n.attrs["training_mode"] or len(n.outputs) != 1:
        return None
    consts = [_const(v) for v in n.inputs[1:5]]
    if any(c is None for c in consts):
        return None
    scale, bias, mean, var = (c.double().reshape(-1) for c in consts if c is not None)
    s = scale / torch.sqrt(var + n.attrs["epsilon"])
    t = bias - mean * s
    a = _anchor(n.inputs[0], uses, n) if n.inputs[0] is not None else None
    if a is not None and _channels(a)[0] == 1 and _channels(a)[1] == s.numel():
        _fold(graph, a, n, s, t)
        return "batchnorm_folded"
    return _decompose(graph, n, s, t)


def _decompose(graph: Graph, n: Node, s: torch.Tensor, t: torch.Tensor) -> str | None:
    """BatchNormalization -> Mul(X, s) + Add(t), per-channel constants shaped [C, 1, ...] in X's dtype."""
    x = n.inputs[0]
    if x is None or x.rank is None or x.rank < 2:
        return None
    view = [-1] + [1] * (x.rank - 2)
    sv = graph.add_initializer(f"{n.name}.scale", s.reshape(view).to(x.dtype.torch))
    tv = graph.add_initializer(f"{n.name}.shift", t.reshape(view).to(x.dtype.torch))
    at = graph.nodes.index(n)
    graph.remove_nodes([n])
    (m,) = graph.add("Mul", [x, sv], name=graph.fresh_name(f"{n.name}.mul"))
    (y,) = graph.add("Add", [m, tv], name=graph.fresh_name(f"{n.name}.add"))
    graph.nodes[at:at] = [graph.nodes.pop(-2), graph.nodes.pop()]
    redirect(graph, n.outputs[0], y)
    return "batchnorm_decomposed"


def _arith(graph: Graph, n: Node, uses: Uses) -> str | None:
    """Mul/Div/Add/Sub of the anchor's output by a per-channel constant."""
    for i in (0, 1):
        v, c = n.inputs[i], _const(n.inputs[1 - i])
        if v is None or c is None or (i == 1 and n.op in ("Div", "Sub")):
            continue
        a = _anchor(v, uses, n)
        if a is None or (a.op == "MatMul" and n.op in ("Add", "Sub")):  # a MatMul's bias stays an Add
            continue
        axis, m = _channels(a)
        assert v.rank is not None
        vec = _per_channel(c, v.rank, axis, m)
        if vec is None or c.dtype != v.dtype.torch:
            continue
        if n.op == "Div" and bool((vec == 0).any()):
            continue
        if n.op in ("Mul", "Div"):
            _fold(graph, a, n, vec if n.op == "Mul" else 1.0 / vec, None)
            return "scale_folded"
        _fold(graph, a, n, torch.ones(m, dtype=torch.float64), vec if n.op == "Add" else -vec)
        return "offset_folded"
    return None


RULES = [
    rule("BatchNormalization", _batchnorm),
    rule(["Mul", "Div", "Add", "Sub"], _arith),
]
