"""Horizontal merging: sibling MatMuls / Gemms / Convs that read the same input with constant weights become one
wider op whose output a Split hands back (the Q, K and V projections; 1x1 inception branches).

Rewrite cases:
- MatMul(x, W_i) for 2-D constant W_i [K, N_i]              -> Split(MatMul(x, concat(W_i, axis 1)), axis -1)
  and when every sibling's only reader is Add(., b_i) with a constant b_i along the output axis ([N_i] or
  [1, .., N_i]): the biases are merged too                 -> Split(Add(MatMul(x, W), concat(b_i)), axis -1)
- Gemm(x, W_i, C_i?) with the same transA and alpha; C_i a constant over the output axis (or absent, or beta 0)
                                                           -> Split(Gemm(x, concat(W_i), concat(beta_i C_i)), axis 1)
- Conv(x, W_i, B_i?) with the same kernel, strides, pads, dilations, auto_pad, group 1
                                                           -> Split(Conv(x, concat(W_i, axis 0), concat(B_i)), axis 1)

The merged weights are new initializers (the old ones go when nothing else reads them). Each sibling's
output keeps its readers (and its name, when it is a graph output).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.matching import add_const, add_node, const, other, readers, remove_dead, sole_reader
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses, redirect

Fits = Callable[[Node], tuple[torch.Tensor, Hashable] | None]


def _siblings(node: Node, uses: Uses, fits: Fits) -> list[tuple[Node, torch.Tensor]]:
    """The readers of node's first input that are the same op, read it as their first input only, and whose
    weight `fits` with the same key (attributes, inner dims) as node's; in graph order. Empty unless there
    are two or more and `node` is the first (so each group is merged once)."""
    x, mine = node.inputs[0], fits(node)
    if x is None or mine is None:
        return []
    out = []
    start = _activation_after(uses, node)
    for n in readers(uses, x):
        if n.op == node.op and n.inputs[0] is x and not any(i is x for i in n.inputs[1:]):
            found = fits(n)
            # Siblings whose outputs go on to different activations stay apart: merged, each activation would
            # be split off the wider op (ResNet's block conv1 + Relu beside its downsample conv).
            if found is not None and found[1] == mine[1] and _activation_after(uses, n) == start:
                out.append((n, found[0]))
    return out if len(out) >= 2 and out[0][0] is node else []


ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSwish", "HardSigmoid", "Gelu", "Swish",
                         "Mish", "Elu", "Selu", "Softplus", "PRelu"})


def _activation_after(uses: Uses, node: Node) -> str:
    """The activation op that alone reads the node's output ("" when there is none)."""
    r = sole_reader(uses, node.outputs[0], ACTIVATIONS) if node.outputs else None
    return r.op if r is not None else ""


# --- MatMul ---------------------------------------------------------------------------------------------


def _matmul_weight(n: Node) -> tuple[torch.Tensor, Hashable] | None:
    w = const(n.inputs[1])
    x = n.inputs[0]
    if w is None or x is None or w.dim() != 2 or x.rank is None or x.rank < 2 or w.dtype != x.dtype.torch:
        return None
    return w, w.shape[0]


def _bias_of(uses: Uses, out: Value, width: int) -> tuple[Node, torch.Tensor] | None:
    """The only reader of `out` adds a constant along the last axis: (that Add, the bias as [width])."""
    add = sole_reader(uses, out, "Add")
    if add is None:
        return None
    b = const(other(add, out))
    if b is None or b.dtype != out.dtype.torch or add.outputs[0].type != out.type or b.dim() > (out.rank or 0):
        return None
    if b.numel() == 0 or any(d != 1 for d in b.shape[:-1]) or b.shape[-1] not in (1, width):
        return None
    return add, b.reshape(-1).expand(width).contiguous()


def _merge_matmuls(graph: Graph, node: Node, uses: Uses) -> str | None:
    group = _siblings(node, uses, _matmul_weight)
    if not group:
        return None
    widths = [w.shape[1] for _, w in group]
    biases = [_bias_of(uses, n.outputs[0], w) for (n, _), w in zip(group, widths)]
    x = node.inputs[0]
    assert x is not None
    weight = add_const(graph, f"{node.name}.merged_weight", torch.cat([w for _, w in group], dim=1))
    (y,) = add_node(graph, node, "MatMul", [x, weight], name=f"{node.name}/merged")
    ends = [n for n, _ in group]
    if all(b is not None for b in biases):
        bias = add_const(graph, f"{node.name}.merged_bias", torch.cat([b[1] for b in biases if b is not None]))
        (y,) = add_node(graph, node, "Add", [y, bias], name=f"{node.name}/merged_bias")
        ends = [b[0] for b in biases if b is not None]
    return _split(graph, node, y, ends, widths, axis=(x.rank or 2) - 1)


# --- Gemm -----------------------------------------------------------------------------------------------


def _gemm_weight(n: Node) -> tuple[torch.Tensor, Hashable] | None:
    """W as [K, N] (transB undone), when constant and C (if read) is a constant over the output axis."""
    w = const(n.inputs[1])
    if w is None or w.dim() != 2 or n.inputs[0] is None or w.dtype != n.inputs[0].dtype.torch:
        return None
    w = w.t() if n.attrs["transB"] else w
    if _gemm_bias(n, w.shape[1]) is None:
        return None
    return w, (w.shape[0], n.attrs["transA"], n.attrs["alpha"])


def _gemm_bias(n: Node, width: int) -> torch.Tensor | None:
    """beta * C as [width] (zeros without C); None when C is not constant or varies along the rows."""
    dtype = n.outputs[0].dtype.torch
    c = n.inputs[2] if len(n.inputs) > 2 else None
    if c is None or n.attrs["beta"] == 0:
        return torch.zeros(width, dtype=dtype)
    b = const(c)
    if b is None or b.dim() > 2 or (b.dim() == 2 and b.shape[0] != 1) or (b.dim() and b.shape[-1] not in (1, width)):
        return None
    b = b.reshape(-1).expand(width)
    return (b if n.attrs["beta"] == 1 else b * n.attrs["beta"]).contiguous()


def _merge_gemms(graph: Graph, node: Node, uses: Uses) -> str | None:
    group = _siblings(node, uses, _gemm_weight)
    if not group:
        return None
    widths = [w.shape[1] for _, w in group]
    biases = [_gemm_bias(n, width) for (n, _), width in zip(group, widths)]
    weight = add_const(graph, f"{node.name}.merged_weight", torch.cat([w for _, w in group], dim=1))
    inputs: list[Value | None] = [node.inputs[0], weight]
    if any(len(n.inputs) > 2 and n.inputs[2] is not None and n.attrs["beta"] != 0 for n, _ in group):
        inputs.append(add_const(graph, f"{node.name}.merged_bias", torch.cat([b for b in biases if b is not None])))
    attrs = {"transA": node.attrs["transA"], "alpha": node.attrs["alpha"], "beta": 1.0, "transB": 0}
    (y,) = add_node(graph, node, "Gemm", inputs, attrs, name=f"{node.name}/merged")
    return _split(graph, node, y, [n for n, _ in group], widths, axis=1)


# --- Conv -----------------------------------------------------------------------------------------------

_CONV_SAME = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def _conv_weight(n: Node) -> tuple[torch.Tensor, Hashable] | None:
    w = const(n.inputs[1])
    b = n.inputs[2] if len(n.inputs) > 2 else None
    if w is None or n.attrs.get("group", 1) != 1 or (b is not None and const(b) is None):
        return None
    return w, (tuple(w.shape[1:]), *(n.attrs.get(k) for k in _CONV_SAME))


def _merge_convs(graph: Graph, node: Node, uses: Uses) -> str | None:
    group = _siblings(node, uses, _conv_weight)
    if not group:
        return None
    widths = [w.shape[0] for _, w in group]
    weight = add_const(graph, f"{node.name}.merged_weight", torch.cat([w for _, w in group], dim=0))
    inputs: list[Value | None] = [node.inputs[0], weight]
    if any(len(n.inputs) > 2 and n.inputs[2] is not None for n, _ in group):
        parts = [_conv_bias(n, width, w.dtype) for (n, w), width in zip(group, widths)]
        inputs.append(add_const(graph, f"{node.name}.merged_bias", torch.cat(parts)))
    (y,) = add_node(graph, node, "Conv", inputs, dict(node.attrs), name=f"{node.name}/merged")
    return _split(graph, node, y, [n for n, _ in group], widths, axis=1)


def _conv_bias(n: Node, width: int, dtype: torch.dtype) -> torch.Tensor:
    b = const(n.inputs[2]) if len(n.inputs) > 2 else None
    return torch.zeros(width, dtype=dtype) if b is None else b


# --- shared ---------------------------------------------------------------------------------------------


def _split(graph: Graph, first: Node, y: Value, ends: list[Node], widths: list[int], axis: int) -> str:
    """Split y into the siblings' widths; each sibling's end node (the op, or its bias Add) reads the new part."""
    sizes = add_const(graph, f"{first.name}.split", torch.tensor(widths, dtype=torch.int64))
    parts = add_node(graph, first, "Split", [y, sizes], {"axis": axis}, outputs=len(widths),
                     name=f"{first.name}/split")
    for end, part in zip(ends, parts):
        if part.type != end.outputs[0].type:  # cannot happen for matched siblings; never change a type
            raise AssertionError(f"merging {end.name}: {part.type} != {end.outputs[0].type}")
        redirect(graph, end.outputs[0], part)
    remove_dead(graph, ends)
    return f"merged_{first.op.lower()}s"


RULES = [
    rule("MatMul", _merge_matmuls),
    rule("Gemm", _merge_gemms),
    rule("Conv", _merge_convs),
]


def merge_siblings(graph: Graph) -> PassResult:
    """Merge sibling projections (counts: merged_matmuls, merged_gemms, merged_convs: groups merged)."""
    return apply_rules(graph, RULES)
