"""Rotary position embedding recognition: the rotate-half form models spell RoPE in becomes one `RotaryEmbedding`.

The matched form (transformers' `apply_rotary_pos_emb`, LLaMA / Qwen / Mistral / ModernBERT ...), on a head tensor
x [B, H, S, D] with D even and h = D / 2:

    rotated = Concat([Neg(Slice(x, h:D, last axis)), Slice(x, 0:h, last axis)], last axis)
    y       = x * cos + rotated * sin              (the two products in either order, each operand order)

where cos and sin are [B or 1, 1, S, D] with equal halves: constants whose two halves are equal, or computed ones
that are Unsqueeze(c, 1) of a c made from Concat([f, f], last axis) by elementwise steps that keep the halves
equal (Cos, Sin, Cast, Mul/Div by a scalar constant) - transformers' `cat((freqs, freqs), -1).cos()` (times its
attention scaling). Rewritten as

    RotaryEmbedding(x, cos[..., :h] [B or 1, S, h], sin[..., :h])       non-interleaved, the whole head rotated

and, when x is a head split Transpose(Reshape(x3 [B, S, H*D], [B, S, H, D]), [0, 2, 1, 3]), on x3 itself
(num_heads=H), the result split the same way: attention recognition then sees its usual packed form.

Partial rotary (GPT-NeoX, Phi, StableLM): x = Slice(x_full, 0:r) of the last axis and the result joined back,
Concat([y, Slice(x_full, r:D)], last axis), becomes RotaryEmbedding(x_full, ..., rotary_embedding_dim=r) (packed
the same way).

Interleaved rotary (GPT-J's rotate_every_two): rotated = Reshape(Concat([Unsqueeze(Neg(x[..., 1::2]), -1),
Unsqueeze(x[..., 0::2], -1)], -1), x's shape), with constant tables repeating each angle twice
([c0, c0, c1, c1, ...]), becomes RotaryEmbedding(interleaved=1) with every other table value. GPT-J rotates x in
[B, S, H, D] (heads after the sequence; tables [1, S, 1, D]): RotaryEmbedding then reads it as [B, S, H*D].
Every intermediate must be read only inside the pattern; the products' rounding changes (RotaryEmbedding rounds
once).
"""

from __future__ import annotations

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.matching import (
    add_const,
    add_node,
    const,
    private,
    producer,
    readers,
    same_dim,
    scalar,
    small_value,
    split_heads,
    swap_in,
)
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses

_KEEP_HALVES = frozenset({"Cos", "Sin", "Cast", "Identity"})


def _last_axis_slice(n: Node | None, x: Value, d: int, step: int = 1) -> tuple[int, int] | None:
    """(start, end) of a Slice of x along its last axis (of size d) with step `step`, clamped to [0, d]."""
    if n is None or n.op != "Slice" or n.inputs[0] is not x or len(n.inputs) < 4 or x.rank is None:
        return None
    starts, ends, axes = (small_value(v) for v in n.inputs[1:4])
    steps = small_value(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] is not None else torch.ones(1)
    if any(t is None or t.numel() != 1 for t in (starts, ends, axes, steps)):
        return None
    assert starts is not None and ends is not None and axes is not None and steps is not None
    if int(axes.reshape(())) % x.rank != x.rank - 1 or int(steps.reshape(())) != step:
        return None
    start, end = int(starts.reshape(())), int(ends.reshape(()))
    start, end = start + d if start < 0 else start, end + d if end < 0 else end
    return max(0, min(start, d)), max(0, min(end, d))


def _rotate_half(r: Value, uses: Uses, mul: Node) -> tuple[Value, list[Node]] | None:
    """x when r = Concat([Neg(x[..., h:]), x[..., :h]], -1), every step read only along the pattern."""
    cat = producer(r, "Concat")
    if cat is None or len(cat.inputs) != 2 or not private(uses, r, mul):
        return None
    neg = producer(cat.inputs[0], "Neg")
    first = producer(neg.inputs[0], "Slice") if neg is not None else None
    second = producer(cat.inputs[1], "Slice")
    x = first.inputs[0] if first is not None else None
    if x is None or second is None or x.shape is None or not isinstance(x.shape[-1], int) or x.shape[-1] % 2:
        return None
    if int(cat.attrs["axis"]) % x.rank != x.rank - 1:  # type: ignore[operator]
        return None
    d = x.shape[-1]
    h = d // 2
    if _last_axis_slice(first, x, d) != (h, d) or _last_axis_slice(second, x, d) != (0, h):
        return None
    assert neg is not None and first is not None
    steps = [cat, neg, first, second]
    for v, reader in ((cat.inputs[0], cat), (cat.inputs[1], cat), (neg.inputs[0], neg)):
        if v is None or not private(uses, v, reader):
            return None
    return x, steps


def _rotate_pairs(r: Value, uses: Uses, mul: Node) -> tuple[Value, list[Node]] | None:
    """x when r = Reshape(Concat([Unsqueeze(Neg(x[..., 1::2]), -1), Unsqueeze(x[..., 0::2], -1)], -1), x's shape)
    - GPT-J's rotate_every_two - every step read only along the pattern."""
    rs = producer(r, "Reshape")
    cat = producer(rs.inputs[0], "Concat") if rs is not None else None
    if rs is None or cat is None or len(cat.inputs) != 2 or not private(uses, r, mul):
        return None
    u0, u1 = producer(cat.inputs[0], "Unsqueeze"), producer(cat.inputs[1], "Unsqueeze")
    neg = producer(u0.inputs[0], "Neg") if u0 is not None else None
    odd = producer(neg.inputs[0], "Slice") if neg is not None else None
    even = producer(u1.inputs[0], "Slice") if u1 is not None else None
    x = even.inputs[0] if even is not None else None
    if x is None or odd is None or odd.inputs[0] is not x or x.shape is None or r.shape != x.shape:
        return None
    d = x.shape[-1]
    if not isinstance(d, int) or d % 2 or x.rank is None or cat.outputs[0].rank != x.rank + 1:
        return None
    assert u0 is not None and u1 is not None and neg is not None and even is not None
    rank = x.rank + 1
    if int(cat.attrs["axis"]) % rank != rank - 1 or not all(_unsqueezes_last(u) for u in (u0, u1)):
        return None
    if _last_axis_slice(even, x, d, 2) != (0, d) or _last_axis_slice(odd, x, d, 2) != (1, d):
        return None
    steps = [rs, cat, u0, u1, neg, odd, even]
    for v, reader in ((cat.outputs[0], rs), (cat.inputs[0], cat), (cat.inputs[1], cat), (u0.inputs[0], u0),
                      (neg.inputs[0], neg), (u1.inputs[0], u1)):
        if v is None or not private(uses, v, reader):
            return None
    return x, steps


def _unsqueezes_last(u: Node) -> bool:
    axes = small_value(u.inputs[1]) if len(u.inputs) > 1 else None
    rank = u.outputs[0].rank
    return axes is not None and rank is not None and axes.numel() == 1 and int(axes.reshape(())) % rank == rank - 1


def _equal_pairs(v: Value) -> bool:
    """v's last axis repeats each value twice ([c0, c0, c1, c1, ...]: GPT-J's repeat_interleave): a constant."""
    c = const(v)
    if not isinstance(c, torch.Tensor) or c.dim() == 0 or c.shape[-1] % 2:
        return False
    return bool(torch.equal(c[..., 0::2], c[..., 1::2]))


def _equal_halves(v: Value) -> bool:
    """v's last axis is two equal halves: a constant that is, or elementwise steps that keep it from a
    Concat([f, f], last axis)."""
    c = const(v)
    if isinstance(c, torch.Tensor):
        if c.dim() == 0 or c.shape[-1] % 2:
            return False
        h = c.shape[-1] // 2
        return bool(torch.equal(c[..., :h], c[..., h:]))
    for _ in range(8):
        p = v.producer
        if p is None:
            return False
        keeps = p.op in _KEEP_HALVES or (p.op == "Unsqueeze" and _unsqueezes_before_last(p))
        if keeps or (p.op in ("Mul", "Div") and scalar(p.inputs[1]) is not None):
            v = p.inputs[0]  # type: ignore[assignment]
        elif p.op == "Mul" and scalar(p.inputs[0]) is not None:
            v = p.inputs[1]  # type: ignore[assignment]
        elif p.op == "Concat" and len(p.inputs) == 2 and p.inputs[0] is p.inputs[1] and v.rank is not None:
            return int(p.attrs["axis"]) % v.rank == v.rank - 1
        else:
            return False
        if v is None:
            return False
    return False


def _unsqueezes_before_last(p: Node) -> bool:
    axes = small_value(p.inputs[1]) if len(p.inputs) > 1 else None
    out = p.outputs[0]
    return axes is not None and out.rank is not None and all(int(a) % out.rank != out.rank - 1
                                                             for a in axes.reshape(-1).tolist())


def _heads_axis(v: Value, x: Value, pairs: bool) -> int | None:
    """The heads axis of x (1: [B, H, S, D]; 2: [B, S, H, D], GPT-J's) when v is a table broadcast over it -
    [B or 1, 1, S, D] or [B or 1, S, 1, D] - in x's dtype whose last axis holds each angle twice (equal halves,
    or equal pairs when `pairs`); else None."""
    s, xs = v.shape, x.shape
    if s is None or xs is None or len(s) != 4 or len(xs) != 4 or v.dtype is not x.dtype:
        return None
    if not same_dim(s[3], xs[3]) or not (s[0] == 1 or same_dim(s[0], xs[0])):
        return None
    if s[1] == 1 and same_dim(s[2], xs[2]):
        axis = 1
    elif s[2] == 1 and same_dim(s[1], xs[1]) and isinstance(const(v), torch.Tensor):  # computed: [B, H, S, D]
        axis = 2
    else:
        return None
    return axis if (_equal_pairs(v) if pairs else _equal_halves(v)) else None


def _table(graph: Graph, at: Node, v: Value, h: int, axis: int = 1, pairs: bool = False) -> Value:
    """v [B or 1, 1, S, 2h] (or [B or 1, S, 1, 2h]) as the [B or 1, S, h] table RotaryEmbedding reads: its first
    half, or every other value when `pairs` (one per v: every layer reads the same cos and sin)."""
    c = const(v)
    if isinstance(c, torch.Tensor):
        name = f"{v.name}.rotary_table" + (".pairs" if pairs else "") + (f".axis{axis}" if axis != 1 else "")
        found = graph.initializers.get(name)
        if found is not None:
            return found
        c = c.select(axis, 0)
        return graph.add_initializer(name, (c[..., 0::2] if pairs else c[..., :h]).contiguous())
    made = next((n.outputs[0] for n in graph.nodes if n.op == "Squeeze" and _is_table(n, v, h)), None)
    if made is not None:
        return made
    ints = {n: add_const(graph, f"{at.name}.{n}", torch.tensor(val, dtype=torch.int64))
            for n, val in (("start", [0]), ("end", [h]), ("axis", [3]), ("heads", [1]))}
    (half,) = add_node(graph, at, "Slice", [v, ints["start"], ints["end"], ints["axis"]], name=f"{at.name}/half")
    (table,) = add_node(graph, at, "Squeeze", [half, ints["heads"]], name=f"{at.name}/table")
    return table


def _is_table(squeeze: Node, v: Value, h: int) -> bool:
    """squeeze = Squeeze(Slice(v, [0], [h], [3]), [1]): a table made for v already."""
    sl = producer(squeeze.inputs[0], "Slice")
    if sl is None or sl.inputs[0] is not v or len(sl.inputs) != 4 or len(squeeze.inputs) != 2:
        return False
    want = ([0], [h], [3], [1])
    got = [small_value(x) for x in (*sl.inputs[1:4], squeeze.inputs[1])]
    return all(t is not None and t.reshape(-1).tolist() == w for t, w in zip(got, want))


def _head_split(x: Value) -> tuple[Value, int] | None:
    """(x3, H) when x = Transpose(split, [0, 2, 1, 3]) of a head split (`matching.split_heads`) with static H."""
    t = producer(x, "Transpose")
    if t is None or tuple(t.attrs.get("perm") or ()) != (0, 2, 1, 3):
        return None
    found = split_heads(t.inputs[0])
    return (found[0], found[1]) if found is not None and isinstance(found[1], int) else None


def _rotary(graph: Graph, add: Node, uses: Uses) -> str | None:
    y = add.outputs[0]
    muls = [producer(v, "Mul") for v in add.inputs]
    if len(add.inputs) != 2 or muls[0] is None or muls[1] is None or muls[0] is muls[1]:
        return None
    for direct, turned in ((muls[0], muls[1]), (muls[1], muls[0])):
        assert direct is not None and turned is not None
        for ri, pairs in ((0, False), (1, False), (0, True), (1, True)):
            r, sin = turned.inputs[ri], turned.inputs[1 - ri]
            rotate = _rotate_pairs if pairs else _rotate_half
            found = rotate(r, uses, turned) if r is not None else None
            if found is None or sin is None:
                continue
            x, steps = found
            if x not in direct.inputs or direct.inputs[0] is direct.inputs[1]:
                continue
            cos = direct.inputs[1] if direct.inputs[0] is x else direct.inputs[0]
            if cos is None or x.shape is None or y.shape != x.shape or x.dtype not in (DType.FLOAT32, DType.FLOAT16,
                                                                                        DType.BFLOAT16):
                continue
            if not (private(uses, direct.outputs[0], add) and private(uses, turned.outputs[0], add)):
                continue
            replaced = [direct, turned, *steps]
            partial = _partial(uses, add, x, replaced)
            if partial is not None:
                full, cat, more = partial
                return _emit(graph, add, cat, full, x, cos, sin, [add, *replaced, *more], pairs)
            return _emit(graph, add, add, x, x, cos, sin, replaced, pairs)
    return None


def _partial(uses: Uses, add: Node, x: Value, pattern: list[Node]) -> tuple[Value, Node, list[Node]] | None:
    """(x_full, cat, its pieces) when x = x_full[..., :r] and the rotated result is joined back to the rest,
    Concat([result, x_full[..., r:]], last axis) - GPT-NeoX's and Phi's partial rotary; x and the rest read only
    along the pattern."""
    sl = producer(x, "Slice")
    full = sl.inputs[0] if sl is not None else None
    if sl is None or full is None or full.shape is None or x.shape is None or full.rank is None:
        return None
    d, r = full.shape[-1], x.shape[-1]
    if not isinstance(d, int) or not isinstance(r, int) or r >= d or _last_axis_slice(sl, full, d) != (0, r):
        return None
    after = readers(uses, add.outputs[0])
    cat = after[0] if len(after) == 1 else None
    if cat is None or cat.op != "Concat" or len(cat.inputs) != 2 or cat.inputs[0] is not add.outputs[0]:
        return None
    rest = producer(cat.inputs[1], "Slice")
    if rest is None or rest.inputs[0] is not full or _last_axis_slice(rest, full, d) != (r, d):
        return None
    if int(cat.attrs["axis"]) % full.rank != full.rank - 1 or not private(uses, cat.inputs[1], cat):  # type: ignore[arg-type]
        return None
    if not all(any(n is m for m in pattern) for n in readers(uses, x)):
        return None
    return full, cat, [sl, rest]


def _emit(graph: Graph, add: Node, end: Node, src: Value, x: Value, cos: Value, sin: Value, replaced: list[Node],
          pairs: bool = False) -> str | None:
    """RotaryEmbedding of `src` in place of `end`'s output, with tables from cos and sin as they multiply x (src
    itself, or its first x.shape[-1] dims: a partial rotary); `pairs`: interleaved."""
    axis = _heads_axis(cos, x, pairs)
    if axis is None or _heads_axis(sin, x, pairs) != axis:
        return None
    r = int(x.shape[3])  # type: ignore[index]
    h = r // 2
    cos_t, sin_t = _table(graph, add, cos, h, axis, pairs), _table(graph, add, sin, h, axis, pairs)
    attrs: dict[str, int] = {} if src is x else {"rotary_embedding_dim": r}
    if pairs:
        attrs["interleaved"] = 1
    tag = "_partial" if src is not x else ""
    if axis == 2:  # [B, S, H, D]: RotaryEmbedding reads it as [B, S, H*D]
        heads = src.shape[2] if src.shape is not None else None
        if not isinstance(heads, int):
            return None
        flat = add_const(graph, f"{add.name}.flat", torch.tensor([0, 0, -1], dtype=torch.int64))
        (x3,) = add_node(graph, end, "Reshape", [src, flat], name=f"{add.name}/flat")
        (y3,) = add_node(graph, end, "RotaryEmbedding", [x3, cos_t, sin_t], {"num_heads": heads, **attrs},
                         name=f"{add.name}/rotary")
        target = add_const(graph, f"{add.name}.heads", torch.tensor([0, 0, heads, -1], dtype=torch.int64))
        (out,) = add_node(graph, end, "Reshape", [y3, target], name=f"{add.name}/split")
        return swap_in(graph, end, out, "rotary_packed" + tag, replaced)
    split = _head_split(src)
    if split is not None:
        x3, heads = split
        (y3,) = add_node(graph, end, "RotaryEmbedding", [x3, cos_t, sin_t], {"num_heads": heads, **attrs},
                         name=f"{add.name}/rotary")
        target = add_const(graph, f"{add.name}.heads", torch.tensor([0, 0, heads, -1], dtype=torch.int64))
        (y4,) = add_node(graph, end, "Reshape", [y3, target], name=f"{add.name}/split")
        (out,) = add_node(graph, end, "Transpose", [y4], {"perm": (0, 2, 1, 3)}, name=f"{add.name}/heads")
        return swap_in(graph, end, out, "rotary_packed" + tag, replaced)
    (out,) = add_node(graph, end, "RotaryEmbedding", [src, cos_t, sin_t], attrs, name=f"{add.name}/rotary")
    return swap_in(graph, end, out, "rotary" + tag, replaced)


RULES = [rule("Add", _rotary)]


def fuse_rotary(graph: Graph) -> PassResult:
    """Replace rotate-half RoPE by `RotaryEmbedding` (counts: rotary_packed on a head split's [B, S, H*D] input,
    rotary on a [B, H, S, D] one)."""
    return apply_rules(graph, RULES)
