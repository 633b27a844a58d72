"""A constant added to a concatenation is added to its pieces instead.

    Add(Concat(x_1, ..., x_k, axis), c)  ->  Concat(Add(x_1, c_1), ..., Add(x_k, c_k), axis)

with c a constant and c_i the part of c over piece i along the axis (c itself where c has size 1 there). The sums
of constant pieces are computed now; the one piece that is not constant keeps an Add that the fusions after this
pass put into the kernel making that piece (an epilogue or a pointwise group), and the Add's own pass over the
whole concatenation is gone. A vision transformer's token sequence is the case: Concat(class token, patch tokens)
+ position embedding becomes Concat(class token + its position embedding (a constant), patch GEMM + bias +
position embedding (one kernel)), one kernel fewer at every batch size.

A piece that is a constant broadcast by an Expand (the class token repeated over the batch, as torchvision's
ViT exports it) counts as constant: Expand(t, shape) + c_i = Expand(t + c_i, shape), c_i broadcasting within the
piece, so its sum is made now too and expanded as before.

Rewrite case: the Concat's output read only by the Add (and no graph output), c a constant of the Concat's dtype
that broadcasts to its output without widening any piece, every piece's size along the axis static where c must be
split, and at most one piece that is not a constant (so no piece gets an Add kernel it would not have had: with
one, the Add moves onto it whole). Before epilogue and pointwise fusion.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.matching import add_const, add_node, const, other, producer
from kiln.passes.rewrite import Uses, graphs, redirect


def distribute_adds(graph: Graph) -> PassResult:
    count = 0
    for g in graphs(graph):
        uses = Uses.of(g)
        for cat in [n for n in g.nodes if n.op == "Concat"]:
            if _distribute(g, cat, uses):
                count += 1
                uses = Uses.of(g)
    return PassResult.of(adds_distributed=count)


def _distribute(g: Graph, cat: Node, uses: Uses) -> bool:
    out = cat.outputs[0]
    add = uses.only_reader(out)
    if add is None or add.op != "Add" or out.shape is None or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return False
    cv = other(add, out)
    c = const(cv)
    if cv is None or c is None or cv.dtype != out.dtype or c.dim() > len(out.shape):
        return False
    rank = len(out.shape)
    axis = int(cat.attrs["axis"]) % rank
    full = c.reshape((1,) * (rank - c.dim()) + tuple(c.shape))
    if any(d != 1 and d != o for d, o in zip(full.shape, out.shape)):
        return False  # it would widen the output: not a per-piece sum
    pieces = [const(x) for x in cat.inputs]
    expanded = [_expanded_constant(x) if p is None else None for x, p in zip(cat.inputs, pieces)]
    if any(x is None or x.shape is None for x in cat.inputs) or \
            sum(p is None and e is None for p, e in zip(pieces, expanded)) > 1:
        return False
    sizes = [x.shape[axis] for x in cat.inputs]  # type: ignore[index,union-attr]
    split = full.shape[axis] != 1
    if split and not all(isinstance(s, int) for s in sizes):
        return False
    parts: list[Any] = list(torch.split(full, [int(s) for s in sizes], dim=axis)) if split else [full] * len(sizes)
    new: list[Value] = []
    for x, data, exp, part in zip(cat.inputs, pieces, expanded, parts):
        assert x is not None
        if data is not None:  # a constant piece: its sum now
            new.append(add_const(g, f"{x.name}+{cv.name}", (data + part).contiguous()))
        elif exp is not None:  # a broadcast constant: its sum now, broadcast as before
            summed_const = add_const(g, f"{exp[1].name}+{cv.name}", (exp[0] + part).contiguous())
            (expanded_sum,) = add_node(g, add, "Expand", [summed_const, exp[1].inputs[1]],
                                       name=f"{exp[1].name}/summed")
            new.append(expanded_sum)
        else:
            operand = cv if not split else add_const(g, f"{cv.name}/{x.name}", part.contiguous())
            (summed,) = add_node(g, add, "Add", [x, operand], name=f"{add.name}/{x.name}")
            new.append(summed)
    (joined,) = add_node(g, add, "Concat", new, dict(cat.attrs), name=f"{cat.name}/summed")
    redirect(g, add.outputs[0], joined)
    g.remove_nodes([add, cat])
    return True


def _expanded_constant(x: Value | None) -> tuple[torch.Tensor, Node] | None:
    """(the constant, the Expand node) when `x` is Expand(constant, shape), else None."""
    e = producer(x, "Expand")
    if e is None or len(e.inputs) != 2 or e.inputs[1] is None:
        return None
    data = const(e.inputs[0])
    return None if data is None else (data, e)
