"""Attention recognition: scaled dot-product attention spelled out in matmuls becomes one `Attention` op.

The matched chain, from the Softmax outwards:

    scores = MatMul(Q', K'^T)                Q' = Q * a (or / a), K'^T = (K * b)^T, each scale optional
    scores = scores * c  (or / c)            optional
    scores = scores + mask                   optional; or Where(cond, scores, -inf) / Where(cond, -inf, scores)
                                             (a fill <= -1e30 is kept as an additive 0 / fill mask)
    probs  = Softmax(Cast?(scores), -1)      a Cast to a wider float here sets softmax_precision
    probs  = Where(IsNaN(probs), 0, probs)   optional: torch's SDPA export zeroing the rows a -inf mask hides
                                             entirely, as `Attention` does (a NaN from NaN inputs is not zeroed)
    out    = MatMul(Cast?(probs), V)

Rewrite cases:
- 4-D: Q [B, H, Sq, D], K [B, Hkv, Skv, D] (K^T as Transpose(K, [0, 1, 3, 2]), or as torch.export writes it,
  Reshape(Transpose(Reshape(K, [B*H, Skv, D]), [0, 2, 1]), [B, H, D, Skv]); any other K^T gets that
  Transpose), V [B, Hkv, Skv, Dv]                          -> Attention(Q, K, V, mask?, scale=a*b*c)
- grouped-query: K and V repeated per query head by Reshape(Expand(Unsqueeze(kv, 2))) (HF repeat_kv; torch.export
  reshapes K's Expand straight to the 3-D rows above) are read before the repeat
                                                          -> Attention with Hkv < H key/value heads
- with the head split and merge around it: Q/K/V = Transpose(Reshape(x [B, S, H*D], [B, S, H, D]), [0, 2, 1, 3])
  (K^T also as one Transpose(.., [0, 2, 3, 1])) and out -> Transpose([0, 2, 1, 3]) -> Reshape([B, Sq, H*Dv])
                                                          -> Attention(q, k, v, mask?, q_num_heads=H,
                                                             kv_num_heads=Hkv) on the 3-D tensors
  (the merge's Transpose read otherwise: that Attention, Reshape([0, 0, H, Dv]) in its place)
  Reshape targets are read from the inferred shapes, which inference computes from constant targets and from
  Shape -> Gather -> Concat chains alike.
- Swin's shifted windows: scores [B*nW, H, S, S] viewed as [B, nW, H, S, S] to add a mask per window wm
  [1, nW, 1 or H, S, S], then viewed back (a per-head mask before, the relative position bias [1, H, S, S], allowed)
                                                          -> Attention on Q, K, V viewed as [B, nW*H, S, D], the
                                                             masks summed as one [1, nW*H, S, S], result viewed back
- causal: a constant mask over square scores that lets query i see exactly keys 0..i (an additive 0 / <= -1e30
  triangle, or a Where on a boolean triangle, as GPT-style exports fold their causal buffer) -> is_causal=1 and
  no mask input (kernels then skip the masked half instead of reading a mask).

The scores, probabilities and everything between the two MatMuls must be read only by the pattern (Shape
nodes reading the merge's Transpose are pointed at an input of the same shape); the inputs' reshapes and
transposes may have other readers (they stay). Batch dims must be provably equal and K/V's heads equal to or
dividing Q's (one K/V head broadcast by MatMul is multi-query attention), so no MatMul broadcasting is lost;
the scores must have the Softmax input's shape (a mask may not broadcast them), the mask must cover all keys
(kiln's Attention pads a shorter mask with -inf instead of broadcasting it), the total scale must be positive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.matching import (
    add_const,
    add_node,
    private,
    producer,
    readers,
    remove_dead,
    same_dim,
    same_shape,
    scalar,
    small_value,
    sole_reader,
    split_heads,
    swap_in,
)
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses, redirect

_BIG_NEGATIVE = -1e30
"""A masked_fill value at or below this acts as -inf: x + fill == fill for any score |x| < 1e21 in float32."""


@dataclass
class _Operand:
    """Q, K or V as the attention reads it: `v4` is [B, H, S, D] (None for a K that only exists transposed);
    `packed` the [B, S, H*D] tensor it was split from and `split` the [B, S, H, D] Reshape output, when it was."""

    v4: Value | None
    packed: Value | None = None
    split: Value | None = None
    heads: sym.Dim | None = None
    repeated: bool = False
    """v4 is a grouped-query K before the per-head repeat the pattern read it through (`_key_by_rows`)."""


def _peel_scale(v: Value) -> tuple[Value, float, list[Node]]:
    """Strip Mul / Div by scalar constants: v = inner * factor; the stripped nodes, outermost first."""
    factor, nodes = 1.0, []
    for _ in range(4):
        p = producer(v, ("Mul", "Div"))
        if p is None:
            break
        a, b = p.inputs[0], p.inputs[1]
        ka, kb = scalar(a), scalar(b)
        if p.op == "Mul" and kb is not None and a is not None and a.type == v.type:
            v, factor = a, factor * kb
        elif p.op == "Mul" and ka is not None and b is not None and b.type == v.type:
            v, factor = b, factor * ka
        elif p.op == "Div" and kb and a is not None and a.type == v.type:
            v, factor = a, factor / kb
        else:
            break
        nodes.append(p)
    return v, factor, nodes


def _perm(node: Node | None, *perm: int) -> bool:
    return node is not None and node.op == "Transpose" and tuple(node.attrs.get("perm") or ()) == perm


def _operand(v4: Value) -> _Operand:
    """Q, K or V as [B, H, S, D], with the packed tensor it was split from when it was."""
    t = producer(v4, "Transpose")
    if t is not None and _perm(t, 0, 2, 1, 3):
        found = split_heads(t.inputs[0])
        if found is not None:
            return _Operand(v4, found[0], t.inputs[0], found[1])
    return _Operand(v4, heads=v4.shape[1] if v4.shape else None)


def _key(kt: Value) -> tuple[_Operand | None, float]:
    """K from K^T [B, H, D, S] (None when K^T is no transpose of a K), and a scale found on K."""
    t = producer(kt, "Transpose")
    if t is not None and t.inputs[0] is not None and _perm(t, 0, 1, 3, 2):
        k4, factor, _ = _peel_scale(t.inputs[0])
        return _operand(k4), factor
    if t is not None and _perm(t, 0, 2, 3, 1):
        found = split_heads(t.inputs[0])
        if found is not None:
            return _Operand(None, found[0], t.inputs[0], found[1]), 1.0
    return _key_by_rows(kt), 1.0


def _key_by_rows(kt: Value) -> _Operand | None:
    """K^T [B, H, D, S] = Reshape(Transpose(Reshape(y, [B*H, S, D]), [0, 2, 1])) - torch.export's spelling of
    K.transpose(-2, -1) - with y the K [B, H, S, D], or the per-head repeat Expand(Unsqueeze(kv, 2)) [B, Hkv, n,
    S, D] of a grouped-query K (then the operand is kv, `repeated`)."""
    outer = producer(kt, "Reshape")
    t = producer(outer.inputs[0], "Transpose") if outer is not None else None
    inner = producer(t.inputs[0], "Reshape") if t is not None and _perm(t, 0, 2, 1) else None
    y = inner.inputs[0] if inner is not None else None
    x3 = inner.outputs[0].shape if inner is not None else None
    if y is None or y.shape is None or x3 is None or len(x3) != 3 or kt.shape is None or len(kt.shape) != 4:
        return None
    b, h, d, s = kt.shape
    if not (same_dim(x3[0], sym.mul(b, h)) and same_dim(x3[1], s) and same_dim(x3[2], d)):
        return None
    if same_shape(y.shape, (b, h, s, d)):
        return _operand(y)
    kv = _unrepeat(y)
    if kv is None or kv.shape is None:
        return None
    kb, hkv, ks, kd = kv.shape
    if same_shape((kb, sym.mul(hkv, y.shape[2]), ks, kd), (b, h, s, d)):
        return _Operand(kv, heads=hkv, repeated=True)
    return None


def _unrepeat(e: Value) -> Value | None:
    """kv [B, Hkv, S, D] when e = Expand(Unsqueeze(kv, 2), [B, Hkv, n, S, D]): each of kv's heads repeated n times in
    a row, as query heads h read key/value head h // n."""
    expand = producer(e, "Expand")
    unsq = producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsq is None or expand is None:
        return None
    kv, axes = unsq.inputs[0], small_value(unsq.inputs[1]) if len(unsq.inputs) > 1 else None
    x = expand.outputs[0].shape
    if kv is None or kv.shape is None or len(kv.shape) != 4 or axes is None or x is None or len(x) != 5:
        return None
    if axes.reshape(-1).tolist() not in ([2], [-3]):
        return None
    b, hkv, s, d = kv.shape
    if not (same_dim(x[0], b) and same_dim(x[1], hkv) and same_dim(x[3], s) and same_dim(x[4], d)):
        return None
    return kv


def _repeat_kv(v4: Value) -> Value:
    """kv [B, Hkv, S, D] when v4 = Reshape(Expand(Unsqueeze(kv, 2), [B, Hkv, n, S, D]), [B, Hkv*n, S, D])."""
    reshape = producer(v4, "Reshape")
    e = reshape.inputs[0] if reshape is not None else None
    kv = _unrepeat(e) if e is not None else None
    if kv is None or kv.shape is None or v4.shape is None or e is None or e.shape is None:
        return v4
    b, hkv, s, d = kv.shape
    return kv if same_shape(v4.shape, (b, sym.mul(hkv, e.shape[2]), s, d)) else v4


def _mask_step(s: Value) -> tuple[Node, Value, Value, object] | None:
    """The mask step producing the softmax input: (node, scores, mask, how) with how 'add' or
    (keep|drop, fill) for a Where keeping the scores where the condition holds (or where it does not)."""
    add = producer(s, "Add")
    if add is not None:
        for i in (0, 1):
            a, m = add.inputs[i], add.inputs[1 - i]
            if a is not None and m is not None and producer(_peel_scale(a)[0], "MatMul") is not None:
                return add, a, m, "add"
    where = producer(s, "Where")
    if where is not None:
        c, a, b = where.inputs
        for scores, fill, kind in ((a, b, "keep"), (b, a, "drop")):
            f = scalar(fill)
            if (scores is not None and f is not None and f <= _BIG_NEGATIVE and c is not None
                    and c.dtype is DType.BOOL and producer(_peel_scale(scores)[0], "MatMul") is not None):
                return where, scores, c, (kind, f)
    return None


def _mask_input(graph: Graph, mask: Value | None, how: object, dtype: DType, before: Node) -> Value | None:
    """The attn_mask input: an additive float mask as it is; a Where condition as bool (fill -inf) or as an
    additive 0 / fill mask."""
    if mask is None or how == "add":
        return mask
    assert isinstance(how, tuple)
    kind, fill = how
    if fill == float("-inf"):
        if kind == "keep":
            return mask
        (m,) = add_node(graph, before, "Not", [mask], name=f"{before.name}/mask")
        return m
    zero = add_const(graph, f"{before.name}.zero", torch.zeros((), dtype=dtype.torch))
    big = add_const(graph, f"{before.name}.fill", torch.tensor(fill, dtype=dtype.torch))
    (m,) = add_node(graph, before, "Where", [mask, zero, big] if kind == "keep" else [mask, big, zero],
                    name=f"{before.name}/mask")
    return m


def _merge_heads(y4: Value, uses: Uses) -> tuple[Node, list[Node], bool] | None:
    """The Reshape of Transpose(y4, [0, 2, 1, 3]) to [B, S, H*Dv], both read only along this chain or by Shape
    nodes (returned: they must be rerouted to a value of the same shape), and False; or, when the rows
    [B, S, H, Dv] are read some other way (torch.export's GPT-2 reshapes them to [B*S, H*Dv] for its Gemm), the
    Transpose, the Shape nodes reading y4, and True (the rows are then the packed result, reshaped)."""
    t, shapes = _one_reader(uses, y4, "Transpose")
    if t is None or not _perm(t, 0, 2, 1, 3) or y4.shape is None:
        return None
    r, more = _one_reader(uses, t.outputs[0], "Reshape")
    b, h, s, d = y4.shape
    if r is not None and same_shape(r.outputs[0].shape, (b, s, sym.mul(h, d))):
        return r, shapes + more, False
    return (t, shapes, True) if isinstance(h, int) and isinstance(d, int) else None


def _one_reader(uses: Uses, v: Value, op: str) -> tuple[Node | None, list[Node]]:
    """The one reader of v that is no Shape node, when it is `op`; and the Shape nodes reading v."""
    rs = readers(uses, v)
    others = [n for n in rs if n.op != "Shape"]
    if v in uses.outputs or len(others) != 1 or others[0].op != op:
        return None, []
    return others[0], [n for n in rs if n.op == "Shape"]


def _reroute(shapes: list[Node], candidates: list[Value | None]) -> bool:
    """Point each Shape node at a candidate of the same shape as what it reads; False (nothing changed) when
    one has no such candidate."""
    plan = []
    for n in shapes:
        v = n.inputs[0]
        alt = next((c for c in candidates if c is not None and v is not None and same_shape(c.shape, v.shape)), None)
        if alt is None:
            return False
        plan.append((n, alt))
    for n, alt in plan:
        n.inputs[0] = alt
    return True


def _nan_guard(uses: Uses, p: Value) -> Value | None:
    """Where(IsNaN(p), 0, p) - torch's SDPA export zeroing the rows a mask hides entirely (all -inf: softmax NaN),
    which `Attention` zeroes itself - when p is read by that pair alone: the Where's output."""
    rs = readers(uses, p)
    isnan = next((n for n in rs if n.op == "IsNaN"), None)
    where = next((n for n in rs if n.op == "Where"), None)
    if len(rs) != 2 or isnan is None or where is None or p in uses.outputs:
        return None
    flag = isnan.outputs[0]
    if where.inputs[0] is not flag or where.inputs[2] is not p or scalar(where.inputs[1]) != 0.0:
        return None
    out = where.outputs[0]
    return out if private(uses, flag, where) and out.type == p.type else None


def _probs_reader(sm: Node, uses: Uses) -> tuple[Node, Value] | None:
    """The MatMul reading the probabilities (through Casts, Identities and the NaN guard, `_nan_guard`), and the
    probabilities' last value."""
    p = sm.outputs[0]
    for _ in range(5):
        guarded = _nan_guard(uses, p)
        if guarded is not None:
            p = guarded
            continue
        n = sole_reader(uses, p, ("Cast", "Identity", "MatMul"))
        if n is None:
            return None
        if n.op == "MatMul":
            return (n, p) if n.inputs[0] is p and n.inputs[1] is not p else None
        if not n.outputs[0].dtype.is_float:
            return None
        p = n.outputs[0]
    return None


@dataclass
class _Scores:
    mm1: Node
    mask: Value | None
    how: object
    scale: float
    window: tuple[Value, int] | None = None
    """(wm [1, nW, 1 or H, S, S], nW): Swin's per-window mask, added in a [B, nW, H, S, S] view (`_windows`)."""


def _scores(sm: Node, uses: Uses) -> _Scores | None:
    """Walk from the softmax input to the Q K^T MatMul: Cast?, mask step?, scale steps; each value on the way
    read only by the next step."""
    s = sm.inputs[0]
    steps: list[Node] = []
    cast = producer(s, "Cast")
    if cast is not None and cast.inputs[0] is not None and cast.inputs[0].dtype.is_float:
        steps.append(cast)
        s = cast.inputs[0]
    window = _windows(s) if s is not None else None
    if window is not None:
        s, wm, nw, window_steps = window
        steps += window_steps
    mask, how = None, None
    found = _mask_step(s) if s is not None else None
    if found is not None:
        node, s, mask, how = found
        steps.append(node)
    if s is None:
        return None
    scores, factor, scale_nodes = _peel_scale(s)
    mm1 = producer(scores, "MatMul")
    if mm1 is None:
        return None
    reader = sm
    for step in [*steps, *scale_nodes, mm1]:  # each step's output is read by the step before it only
        if not private(uses, step.outputs[0], reader):
            return None
        reader = step
    if window is not None and (how not in (None, "add") or (mask is not None and (mask.shape is None or mask.rank != 4
                                                                                 or mask.shape[0] != 1))):
        return None  # a window mask beside a mask of its own for each of the B * nW windows: not folded
    return _Scores(mm1, mask, how, factor, None if window is None else (wm, nw))


def _windows(s: Value) -> tuple[Value, Value, int, list[Node]] | None:
    """Swin's shifted-window scores: s = Reshape(Add(Reshape(s4 [B*nW, H, S, S], [B, nW, H, S, S]), wm), back to
    s4's shape), wm [1, nW, 1 or H, S, S] a mask per window: (s4, wm, nW, the three steps outermost first)."""
    outer = producer(s, "Reshape")
    add = producer(outer.inputs[0], "Add") if outer is not None else None
    if add is None or add.outputs[0].shape is None or len(add.outputs[0].shape) != 5:
        return None
    for i in (0, 1):
        inner, wm = producer(add.inputs[i], "Reshape"), add.inputs[1 - i]
        s4 = inner.inputs[0] if inner is not None else None
        if s4 is None or wm is None or s4.shape is None or wm.shape is None or len(wm.shape) != 5:
            continue
        b5, nw, h, q, k = add.outputs[0].shape
        if not (isinstance(nw, int) and isinstance(h, int) and same_shape(s4.shape, s.shape)
                and same_shape(inner.outputs[0].shape, (b5, nw, h, q, k))  # type: ignore[union-attr]
                and same_shape(s4.shape, (sym.mul(b5, nw), h, q, k))
                and wm.shape[0] == 1 and wm.shape[1] == nw and wm.shape[2] in (1, h)
                and same_dim(wm.shape[3], q) and same_dim(wm.shape[4], k)):
            continue
        return s4, wm, nw, [outer, add, inner]  # type: ignore[list-item]
    return None


def _attention(graph: Graph, sm: Node, uses: Uses) -> str | None:
    x = sm.inputs[0]
    if x is None or x.rank != 4 or sm.attrs["axis"] not in (-1, 3):
        return None
    found = _probs_reader(sm, uses)
    sc = _scores(sm, uses)
    if found is None or sc is None or not same_shape(x.shape, sc.mm1.outputs[0].shape):
        return None
    mm2, probs = found
    mm1 = sc.mm1
    if mm1.inputs[0] is None or mm1.inputs[1] is None or mm2.inputs[1] is None:
        return None
    q_in, a, _ = _peel_scale(mm1.inputs[0])
    kt_in, b, _ = _peel_scale(mm1.inputs[1])
    k, b2 = _key(kt_in)
    scale = a * b * b2 * sc.scale
    scores, y4 = mm1.outputs[0], mm2.outputs[0]
    dtype = q_in.dtype
    if scale <= 0 or probs.dtype is not dtype or scores.shape is None or y4.shape is None:
        return None
    mask = sc.mask
    if mask is not None and mask.shape is not None and mask.rank and not same_dim(mask.shape[-1], scores.shape[-1]):
        return None
    q, v = _operand(q_in), _operand(mm2.inputs[1])
    if k is not None and k.v4 is not None and v.v4 is not None:
        k_base = k.v4 if k.repeated else _repeat_kv(k.v4)
        v_base = _repeat_kv(v.v4)
        if (k.repeated or k_base is not k.v4) != (v_base is not v.v4):
            return None
        k, v = _operand(k_base), _operand(v_base)
    attrs: dict[str, object] = {"scale": scale}
    if x.dtype is not dtype:
        attrs["softmax_precision"] = x.dtype
    if sc.window is not None:
        return _emit_windows(graph, mm2, q, k, v, kt_in, sc, attrs, dtype, scores)
    merge = _merge_heads(y4, uses)
    if (merge is not None and k is not None and q.packed is not None and k.packed is not None
            and v.packed is not None and isinstance(q.heads, int) and isinstance(k.heads, int)
            and _shapes_ok(_bhsd(q.split), _bhsd(k.split), _bhsd(v.split), scores)
            and _reroute(merge[1], [q.v4, q.split, v.v4, v.split])):
        attrs.update(q_num_heads=q.heads, kv_num_heads=k.heads)
        rows = y4.shape[1:4:2] if merge[2] else None  # (H, Dv): the packed result is reshaped to [B, S, H, Dv]
        return _emit(graph, merge[0], [q.packed, k.packed, v.packed], sc, attrs, dtype, "attention_packed", rows)
    k_shape = _bhsd(k.split) if k is not None and k.v4 is None else (
        k.v4.shape if k is not None and k.v4 is not None else _swap_last(kt_in.shape))
    if q.v4 is None or v.v4 is None or not _shapes_ok(q.v4.shape, k_shape, v.v4.shape, scores):
        return None
    if k is not None and k.v4 is not None:
        k4 = k.v4
    elif k is not None:
        (k4,) = add_node(graph, mm2, "Transpose", [k.split], {"perm": (0, 2, 1, 3)}, name=f"{mm2.name}/K")
    else:
        (k4,) = add_node(graph, mm2, "Transpose", [kt_in], {"perm": (0, 1, 3, 2)}, name=f"{mm2.name}/K")
    return _emit(graph, mm2, [q.v4, k4, v.v4], sc, attrs, dtype, "attention")


def _emit_windows(graph: Graph, mm2: Node, q: _Operand, k: _Operand | None, v: _Operand, kt_in: Value,
                  sc: _Scores, attrs: dict[str, object], dtype: DType, scores: Value) -> str | None:
    """Windows folded into heads: Q, K, V [B*nW, H, S, D] viewed as [B, nW*H, S, D], the window mask (plus a
    per-head mask [1, H, S, S], Swin's relative position bias) as one [1, nW*H, S, S] mask that broadcasts over B,
    and the result viewed back as [B*nW, H, S, Dv]."""
    assert sc.window is not None
    wm, nw = sc.window
    if q.v4 is None or v.v4 is None or k is None or k.v4 is None or k.repeated or scores.shape is None:
        return None
    ks = k.v4.shape
    if ks is None or not _shapes_ok(q.v4.shape, ks, v.v4.shape, scores):
        return None
    h, n_q, n_k = scores.shape[1:]
    if not (isinstance(h, int) and isinstance(n_q, int) and isinstance(n_k, int)) or ks[1] != h:
        return None  # windows of a static size, as many key/value heads as query heads
    # Reshape's 0 keeps that dim of the input: S and D of [B*nW, H, S, D]
    folded = add_const(graph, f"{mm2.name}.windows", torch.tensor([-1, nw * h, 0, 0], dtype=torch.int64))
    views = [add_node(graph, mm2, "Reshape", [t, folded], name=f"{mm2.name}/windows")[0] for t in (q.v4, k.v4, v.v4)]
    full = add_const(graph, f"{mm2.name}.window_mask", torch.tensor([1, nw, h, n_q, n_k], dtype=torch.int64))
    mask = wm
    if sc.mask is not None:  # [1, H, S, S] -> [1, 1, H, S, S], added to each window's mask
        (m5,) = add_node(graph, mm2, "Unsqueeze", [sc.mask, add_const(graph, f"{mm2.name}.axis", torch.tensor([1]))],
                         name=f"{mm2.name}/bias")
        (mask,) = add_node(graph, mm2, "Add", [wm, m5], name=f"{mm2.name}/window_bias")
    if mask.shape is None or mask.shape[2] != h:
        (mask,) = add_node(graph, mm2, "Expand", [mask, full], name=f"{mm2.name}/window_heads")
    flat = add_const(graph, f"{mm2.name}.mask4", torch.tensor([1, nw * h, n_q, n_k], dtype=torch.int64))
    (m4,) = add_node(graph, mm2, "Reshape", [mask, flat], name=f"{mm2.name}/window_mask")
    (y,) = add_node(graph, mm2, "Attention", [*views, m4], attrs, name=f"{mm2.name}/Attention")
    back = add_const(graph, f"{mm2.name}.unfold", torch.tensor([-1, h, 0, 0], dtype=torch.int64))
    (y4,) = add_node(graph, mm2, "Reshape", [y, back], name=f"{mm2.name}/unfold")
    return swap_in(graph, mm2, y4, "attention_windows")


def _bhsd(split: Value | None) -> tuple | None:
    """The [B, H, S, D] shape of a [B, S, H, D] tensor."""
    s = split.shape if split is not None else None
    return None if s is None or len(s) != 4 else (s[0], s[2], s[1], s[3])


def _swap_last(shape: tuple | None) -> tuple | None:
    return None if shape is None or len(shape) != 4 else (*shape[:2], shape[3], shape[2])


def _causal(mask: Value | None, how: object, scores: Value) -> bool:
    """The mask is a constant that lets query i see exactly keys 0..i (square scores): is_causal instead."""
    t = None if mask is None else (mask.data if mask.data is not None else mask.folded)
    sh = scores.shape
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or sh is None or len(sh) < 2:
        return False
    n = t.shape[-1]
    if t.shape[-2] != n or n < 2 or any(d != 1 for d in t.shape[:-2]) or sh[-1] != n or sh[-2] != n:
        return False
    below = torch.ones(n, n, dtype=torch.bool).tril()
    t = t.reshape(n, n)
    if how == "add":
        return bool(t.is_floating_point() and (t[below] == 0).all() and (t[~below] <= _BIG_NEGATIVE).all())
    if t.dtype != torch.bool or not isinstance(how, tuple):
        return False
    return bool(torch.equal(t, below if how[0] == "keep" else ~below))


def _emit(graph: Graph, anchor: Node, inputs: list[Value | None], sc: _Scores, attrs: dict[str, object],
          dtype: DType, what: str, rows: tuple | None = None) -> str | None:
    """`rows` (H, Dv): the Attention's [B, S, H*Dv] result reshaped to [B, S, H, Dv] replaces `anchor`'s output."""
    if _causal(sc.mask, sc.how, sc.mm1.outputs[0]):
        attrs = {**attrs, "is_causal": 1}
        sc = replace(sc, mask=None, how=None)
    m = _mask_input(graph, sc.mask, sc.how, dtype, anchor)
    out = anchor.outputs[0]
    (y,) = add_node(graph, anchor, "Attention", [*inputs, *([m] if m is not None else [])], attrs,
                    name=f"{anchor.name}/Attention")
    if rows is not None:  # Reshape's 0 keeps B and S as they are
        target = add_const(graph, f"{anchor.name}.rows", torch.tensor([0, 0, *rows], dtype=torch.int64))
        (y,) = add_node(graph, anchor, "Reshape", [y, target], name=f"{anchor.name}/rows")
    if y.type != out.type:  # cannot happen for a matched pattern; never change an output's type
        remove_dead(graph, [y.producer] if y.producer is not None else [])
        return None
    redirect(graph, out, y)
    remove_dead(graph, [anchor])
    return what


def _shapes_ok(q: tuple | None, k: tuple | None, v: tuple | None, scores: Value) -> bool:
    """Q [B, H, Sq, D], K [B, Hkv, Skv, D], V [B, Hkv, Skv, Dv] with equal batches, Hkv dividing H, and the
    scores [B, H, Sq, Skv] (no MatMul broadcasting)."""
    if q is None or k is None or v is None or scores.shape is None or not len(q) == len(k) == len(v) == 4:
        return False
    (bq, hq, sq, dq), (bk, hk, sk, dk), (bv, hv, sv, _) = q, k, v
    if not (same_dim(bq, bk) and same_dim(bq, bv) and same_dim(hk, hv) and same_dim(sk, sv) and same_dim(dq, dk)):
        return False
    if not same_shape(scores.shape, (bq, hq, sq, sk)):
        return False
    if same_dim(hq, hk):
        return True
    return isinstance(hq, int) and isinstance(hk, int) and hk > 0 and hq % hk == 0


RULES = [rule("Softmax", _attention)]


def fuse_attention(graph: Graph) -> PassResult:
    """Replace decomposed attention by `Attention` (counts: attention_packed on the 3-D [B, S, H*D] tensors,
    attention on 4-D [B, H, S, D] ones, attention_windows for Swin's windows folded into heads)."""
    return apply_rules(graph, RULES)

