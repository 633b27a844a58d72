"""Packed attention: projections computed in another axis order and split into heads by chains of data
movement become the [batch, seq, features] form - one projection, one Split, packed Attention, one output
projection - with no transposes left around them.

torch's nn.MultiheadAttention (and so torchvision's ViT) exports a sequence-first attention:

    xt = Transpose(x [B,S,E], (1,0,2));  y = MatMul(xt, W_in) [S,B,3E]
    q4, k4, v4 = Reshape/Transpose/Squeeze/Gather/Reshape/Transpose/Reshape chains of y     [B,H,S,D] each
    o = Attention(q4, k4, v4)
    r = Transpose(Reshape(Gemm(Reshape(Transpose(o)), W_out, b)))                              [B,S,E]

Rewrite cases (each checked, not assumed: a chain of pure data movement is run on an index tensor - arange
over the source - and must place every element where the rewritten form puts it):
- Attention whose Q/K/V are data-movement chains of one MatMul(T, W) (+ a constant bias vector; W constant), T
  being X [B, S, E] or whole rows of it moved (the sequence-first Transpose; at batch 1 a Reshape, as no-op
  removal leaves it), each equal to a head split of a column block of MatMul(X, W)
      -> Split(MatMul(X, W)) -> Attention(packed, q_num_heads=H, kv_num_heads=Hkv), the 4-D output restored by
         Transpose(Reshape(.)) for the existing readers (the second case removes them);
- MatMul/Gemm with a constant weight whose 2-D input is a row permutation of a tensor T (by data movement) and
  whose output reaches R by data movement that undoes that permutation
      -> R = MatMul(T, W') (+ Add(bias)): the rows are never shuffled.
Needs static shapes (fixed in the profile). Run after fuse_attention (it reads Attention nodes) and before
weight folding, sibling merging and epilogue fusion, which then give the BERT-like 8 steps per block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.ops.base import run_nodes
from kiln.passes.manager import PassResult
from kiln.passes.matching import add_const, add_node, const, remove_dead
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses, try_redirect

MOVES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Gather", "Slice",
                   "Split"})
"""Ops that only move elements (their other inputs must be constants)."""


def _shape(v: Value | None) -> tuple[int, ...] | None:
    t = None if v is None else v.type
    if not isinstance(t, TensorType) or t.shape is None or not all(isinstance(d, int) for d in t.shape):
        return None
    return tuple(int(d) for d in t.shape)


def _movement(n: Node) -> bool:
    return n.op in MOVES and all(v is None or const(v) is not None for v in n.inputs[1:])


def _walk_up(v: Value) -> tuple[Value, list[Node]]:
    """The first value above `v` that is not made by data movement, and the movement nodes from it to `v`."""
    chain: list[Node] = []
    while v.producer is not None and _movement(v.producer) and len(chain) < 32:
        chain.append(v.producer)
        v = v.producer.inputs[0]  # type: ignore[assignment]
    return v, chain[::-1]


def _run(chain: Sequence[Node], source: Value, x: torch.Tensor, target: Value) -> torch.Tensor | None:
    """`target` computed from `source = x` through the movement nodes `chain` (op references)."""
    try:
        env = run_nodes(chain, {source: x})
    except Exception:
        return None
    out = env.get(target)
    return out if isinstance(out, torch.Tensor) else None


# --- Q/K/V: head splits of one projection ----------------------------------------------------------------


def _projection(y: Value) -> tuple[Node, Value, torch.Tensor, Value | None] | None:
    """y = MatMul(T, W) (+ bias) where T is X [B, S, E] itself or whole rows of it moved by data movement (the
    sequence-first Transpose; a Reshape where B is 1): the MatMul, X, y's elements as indices into Z = X @ W
    ([B, S, N] numbered in order) and the bias (a constant vector over the output features, or None)."""
    mm, bias = y.producer, None
    if mm is not None and mm.op == "Add":
        for i in (0, 1):
            a, b = mm.inputs[i], mm.inputs[1 - i]
            c = const(b)
            if a is not None and a.producer is not None and a.producer.op == "MatMul" and c is not None \
                    and c.dim() >= 1 and c.numel() == c.shape[-1]:
                mm, bias = a.producer, b
                break
    if mm is None or mm.op != "MatMul" or mm.inputs[0] is None:
        return None
    w = const(mm.inputs[1])
    if w is None or w.dim() != 2:
        return None
    t = mm.inputs[0]
    n = int(w.shape[1])
    _, chain = _walk_up(t)
    for cut in range(len(chain) + 1):  # the highest 3-D source whose rows T takes whole
        src = chain[cut].inputs[0] if cut < len(chain) else t
        xs = _shape(src)
        if src is None or xs is None or len(xs) != 3:
            continue
        idx = torch.arange(xs[0] * xs[1] * xs[2]).reshape(xs)
        rows = _run(chain[cut:], src, idx, t) if cut < len(chain) else idx
        if rows is None or rows.dim() < 1 or rows.shape[-1] != xs[2]:
            continue
        first = rows[..., :1]
        if not torch.equal(rows, first + torch.arange(xs[2])) or bool((first % xs[2]).any()):
            continue
        return mm, src, (first // xs[2]) * n + torch.arange(n), bias
    return None


def _head_block(got: torch.Tensor, z: tuple[int, ...]) -> int | None:
    """The first column of the block of Z = [B, S, N] that `got` [B, H, S, D] is the head split of, or None."""
    b, s, n = z
    if got.dim() != 4 or got.shape[0] != b or got.shape[2] != s:
        return None
    h, d = got.shape[1], got.shape[3]
    start = int(got.reshape(-1)[0]) % n
    if start + h * d > n:
        return None
    idx = torch.arange(b * s * n).reshape(b, s, n)
    want = idx[..., start:start + h * d].reshape(b, s, h, d).transpose(1, 2)
    return start if torch.equal(got, want) else None


def _pack(graph: Graph, att: Node, uses: Uses) -> str | None:
    if att.attrs["q_num_heads"] is not None or len(att.outputs) != 1 or any(v is None for v in att.inputs[:3]):
        return None
    bases = [_walk_up(v) for v in att.inputs[:3]]  # type: ignore[arg-type]
    y = bases[0][0]
    if any(b is not y for b, _ in bases) or not all(chain for _, chain in bases):
        return None
    found = _projection(y)
    if found is None:
        return None
    mm, x, probe, bias = found
    xs, ys = _shape(x), _shape(y)
    if xs is None or ys is None or tuple(probe.shape) != ys:
        return None
    w = const(mm.inputs[1])
    assert w is not None
    z = (xs[0], xs[1], int(w.shape[1]))
    starts = []
    for (_, chain), v in zip(bases, att.inputs[:3]):
        got = _run(chain, y, probe, v)  # type: ignore[arg-type]
        start = None if got is None else _head_block(got, z)
        if start is None:
            return None
        starts.append(start)
    heads = [int(_shape(v)[1]) for v in att.inputs[:3]]  # type: ignore[index]
    widths = [h * int(_shape(v)[3]) for h, v in zip(heads, att.inputs[:3])]  # type: ignore[index]
    return _emit(graph, att, mm, x, bias, starts, widths, heads)


def _emit(graph: Graph, att: Node, mm: Node, x: Value, bias: Value | None, starts: list[int], widths: list[int],
          heads: list[int]) -> str | None:
    (proj,) = add_node(graph, att, "MatMul", [x, mm.inputs[1]], name=f"{mm.name}/packed")
    if bias is not None:
        (proj,) = add_node(graph, att, "Add", [proj, bias], name=f"{mm.name}/packed_bias")
    n = int(mm.inputs[1].data.shape[1]) if mm.inputs[1].data is not None else None  # type: ignore[union-attr]
    if starts == [0, widths[0], widths[0] + widths[1]] and sum(widths) == n:
        split = add_const(graph, f"{att.name}.split", torch.tensor(widths, dtype=torch.int64))
        qkv = add_node(graph, att, "Split", [proj, split], {"axis": -1}, outputs=3, name=f"{att.name}/qkv")
    else:
        qkv = []
        for s, wd in zip(starts, widths):
            lo = add_const(graph, f"{att.name}.lo", torch.tensor([s]))
            hi = add_const(graph, f"{att.name}.hi", torch.tensor([s + wd]))
            ax = add_const(graph, f"{att.name}.axis", torch.tensor([-1]))
            qkv += add_node(graph, att, "Slice", [proj, lo, hi, ax], name=f"{att.name}/slice")
    attrs = {**att.attrs, "q_num_heads": heads[0], "kv_num_heads": heads[1]}
    (packed,) = add_node(graph, att, "Attention", [*qkv, *att.inputs[3:]], attrs, name=f"{att.name}/packed")
    out = att.outputs[0]
    b, h, s, d = _shape(out)  # type: ignore[misc]
    shape = add_const(graph, f"{att.name}.bshd", torch.tensor([b, s, h, d]))
    (r,) = add_node(graph, att, "Reshape", [packed, shape], name=f"{att.name}/heads")
    (o4,) = add_node(graph, att, "Transpose", [r], {"perm": (0, 2, 1, 3)}, name=f"{att.name}/bhsd")
    if o4.type != out.type or not try_redirect(graph, out, o4):
        remove_dead(graph, [o4.producer] if o4.producer is not None else [])
        return None
    remove_dead(graph, [att])
    graph.toposort()
    return "attention_packed"


# --- the output projection: rows shuffled and unshuffled around a GEMM ---------------------------------------


def _walk_down(v: Value, uses: Uses) -> tuple[Value, list[Node]]:
    chain: list[Node] = []
    while len(chain) < 32 and v not in uses.outputs:
        rs = uses.readers.get(v, [])
        if len(rs) != 1 or not _movement(rs[0]) or rs[0].inputs[0] is not v or len(rs[0].outputs) != 1:
            break
        chain.append(rs[0])
        v = rs[0].outputs[0]
    return v, chain


def _unshuffle(graph: Graph, g: Node, uses: Uses) -> str | None:
    if g.inputs[0] is None or len(g.outputs) != 1:
        return None
    w = const(g.inputs[1])
    if w is None or w.dim() != 2 or (g.op == "Gemm" and g.attrs["transA"]):
        return None
    p = g.inputs[0]
    src, up = _walk_up(p)
    r, down = _walk_down(g.outputs[0], uses)
    ps, ss, rs = _shape(p), _shape(src), _shape(r)
    if not up or not down or ps is None or ss is None or rs is None or len(ps) != 2 or len(ss) < 2:
        return None
    e = ss[-1]
    rows = _run(up, src, torch.arange(int(torch.tensor(ss).prod())).reshape(ss), p)
    if rows is None or tuple(rows.shape) != ps or ps[1] != e:
        return None
    first = rows[:, 0]
    if not torch.equal(rows, first[:, None] + torch.arange(e)) or bool((first % e).any()):
        return None  # not whole rows of the source, in order
    n_out = _shape(g.outputs[0])[1]  # type: ignore[index]
    marked = (first // e)[:, None] * n_out + torch.arange(n_out)
    back = _run(down, g.outputs[0], marked, r)
    if back is None or tuple(rs) != (*ss[:-1], n_out) or not torch.equal(back, torch.arange(back.numel()).reshape(rs)):
        return None
    return _emit_linear(graph, g, src, r)


def _emit_linear(graph: Graph, g: Node, src: Value, r: Value) -> str | None:
    w = const(g.inputs[1])
    assert w is not None
    bias = None
    if g.op == "Gemm":
        a = g.attrs
        w = (w.t() if a["transB"] else w) * a["alpha"]
        c = const(g.inputs[2]) if len(g.inputs) > 2 and g.inputs[2] is not None else None
        if len(g.inputs) > 2 and g.inputs[2] is not None:
            if c is None or c.numel() not in (1, w.shape[1]) or (c.dim() == 2 and c.shape[0] != 1):
                return None
            bias = (c.reshape(-1) * a["beta"]).expand(w.shape[1]).contiguous()
    wv = add_const(graph, f"{g.name}.weight", w.contiguous())
    (y,) = add_node(graph, g, "MatMul", [src, wv], name=f"{g.name}/rows")
    if bias is not None:
        bv = add_const(graph, f"{g.name}.bias", bias)
        (y,) = add_node(graph, g, "Add", [y, bv], name=f"{g.name}/bias")
    if y.type != r.type or not try_redirect(graph, r, y):
        remove_dead(graph, [y.producer] if y.producer is not None else [])
        return None
    remove_dead(graph, [r.producer] if r.producer is not None else [])
    graph.toposort()
    return "rows_kept_in_order"


RULES = [rule("Attention", _pack), rule(("MatMul", "Gemm"), _unshuffle)]


def pack_attention(graph: Graph) -> PassResult:
    return apply_rules(graph, RULES)
