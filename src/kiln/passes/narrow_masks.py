"""Narrow attention masks: an attention mask that only a constant all-true operand makes as tall as the queries
is computed from the narrower operand instead.

transformers' exported BERT builds its padding mask as

    cond = And(GreaterOrEqual(...) [1, 1, S, 1] (constant, all true), keep [B, 1, 1, S]) -> [B, 1, S, S]
    mask = Where(cond, 0.0, finfo.min)                                                   -> [B, 1, S, S]

and every layer's Attention reads `mask`. The rows are identical, so `Where(keep, 0.0, finfo.min)` [B, 1, 1, S]
is the same mask broadcast; the attention kernel then reads one row of it per key block instead of a
[BLOCK_M, BLOCK_N] tile (which it holds beside the scores: compiled for sm_90a, the tile spills 736 bytes a
thread at 64 x 64, the row none), and the Where writes S times fewer values.

Rewrite cases:
- Where(And(c, x) | And(x, c), a, b), c a constant of all true, a and b constants, read only as Attention masks
  -> Where(x, a, b), when it still broadcasts to every reader's [B, H, Sq, Skv].
- the same with c the causal triangle (constant [1, 1, S, S], query i keeping keys 0..i), a = 0 and b = -inf -
  LLaMA-style models' TorchScript export of causal + padding masks - read only by Attention nodes of S queries
  and S keys: Where(x, 0, -inf) and is_causal on every reader (exact: a key hidden by both is -inf either way, a
  row hidden entirely is all -inf either way); the kernels then skip the blocks above the diagonal.
  With a finite fill (torch.export writes finfo.min) a row hidden entirely averages over all keys, and would
  average over keys 0..i alone under is_causal: those masks stay.

Run after fuse_attention (it reads Attention nodes) and before pointwise fusion (which would take the And).
"""

from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node, Shape, Value
from kiln.passes.manager import PassResult
from kiln.passes.matching import add_node, const, producer
from kiln.passes.rewrite import Uses, graphs

MASK_INPUT = 3
"""Attention's attn_mask input."""


def narrow_masks(graph: Graph) -> PassResult:
    count = 0
    for g in graphs(graph):
        uses = Uses.of(g)
        for where in [n for n in g.nodes if n.op == "Where"]:
            if _narrow(g, where, uses):
                count += 1
                uses = Uses.of(g)
    return PassResult.of(masks_narrowed=count)


def _narrow(g: Graph, where: Node, uses: Uses) -> bool:
    cond, a, b = where.inputs
    out = where.outputs[0]
    readers = uses.readers.get(out, [])
    if not readers or out in uses.outputs or const(a) is None or const(b) is None:
        return False
    if any(r.op != "Attention" or len(r.inputs) <= MASK_INPUT or r.inputs[MASK_INPUT] is not out
           or r.inputs.count(out) != 1 for r in readers):
        return False
    both = producer(cond, "And")
    if both is None:
        return False
    p, q = both.inputs
    x = q if _all_true(p) else p if _all_true(q) else None
    causal = False
    if x is None and _causal_fill(a, b):
        x = q if _triangle(p, readers) else p if _triangle(q, readers) else None
        causal = x is not None
    if x is None or x.shape is None or out.shape is None:
        return False
    (narrow,) = add_node(g, where, "Where", [x, a, b], name=f"{where.name}.narrow")
    if not _broadcasts(narrow.shape, out.shape):
        g.remove_nodes([narrow.producer] if narrow.producer is not None else [])
        return False
    for r in readers:
        r.inputs[MASK_INPUT] = narrow
        if causal:
            r.attrs["is_causal"] = 1
    return True


def _causal_fill(a: Value | None, b: Value | None) -> bool:
    """Where(cond, 0, -inf): kept keys add 0, hidden ones -inf."""
    ca, cb = const(a), const(b)
    return (isinstance(ca, torch.Tensor) and isinstance(cb, torch.Tensor) and ca.numel() == 1 and cb.numel() == 1
            and float(ca.reshape(())) == 0.0 and float(cb.reshape(())) == float("-inf"))


def _triangle(v: Value | None, readers: list[Node]) -> bool:
    """v is the constant causal triangle [1, 1, S, S] (True where key j <= query i) and every reader attends S
    queries over S keys, not causal yet (nor windowed or cached)."""
    c = const(v)
    if not isinstance(c, torch.Tensor) or c.dtype != torch.bool or c.dim() != 4 or c.shape[:2] != (1, 1):
        return False
    n = c.shape[-1]
    if c.shape[-2] != n or n < 2 or not torch.equal(c[0, 0], torch.ones(n, n, dtype=torch.bool).tril()):
        return False
    for r in readers:
        a = r.attrs
        q, k = r.inputs[0], r.inputs[1]
        seq = 1 if q is not None and q.rank == 3 else 2
        if a.get("is_causal") or a.get("left_window_size", -1) != -1 or a.get("right_window_size", -1) != -1:
            return False
        if len(r.inputs) > 4 and any(i is not None for i in r.inputs[4:]):
            return False
        if q is None or k is None or q.shape is None or k.shape is None or q.shape[seq] != n or k.shape[seq] != n:
            return False
    return True


def _all_true(v: Value | None) -> bool:
    c = const(v)
    return isinstance(c, torch.Tensor) and c.dtype == torch.bool and bool(c.all())


def _broadcasts(shape: Shape | None, full: Shape) -> bool:
    """`shape` broadcasts to `full` (right-aligned, each dim 1 or equal): a mask that did broadcast to every
    reader's scores still does."""
    if shape is None or len(shape) > len(full):
        return False
    return all(d == 1 or d == f for d, f in zip(reversed(shape), reversed(full)))
