"""Attention over more than one batch axis as 4-D attention: the leading axes of a 5-D product are folded into one
batch axis, so that attention recognition (`fuse_attention`, which reads [B, H, S, D] operands) sees it.

MaxViT computes its block and grid attention on [B, G, H, S, D] tensors (G windows per image), with a relative
position bias [1, H, S, S] (or one for every window) added to the scores. The matched form, on 5-D q, k^T, v:

    p = Softmax(MatMul(q, kt) [+ bias], last axis)      q [B, G, H, S, D], kt [B, G, H, D, T]
    y = MatMul(p, v)                                     v [B, G, H, T, Dv]

with H, S, D, T, Dv static, and a bias whose two leading axes are both 1, or both the scores' own (B may be
symbolic: the reshapes fold it with -1). Rewritten as the same steps on q, kt, v reshaped to [B*G, H, ...] (the
bias to [1, H, S, T] or [B*G, H, S, T]), and y reshaped back to [B, G, H, S, Dv]. Exact: the same products and
sums in the same order. The scores, the bias sum and the probabilities must be read only along the pattern. A kt
that is Transpose(k, [0, 1, 2, 4, 3]) becomes the 4-D transpose of k reshaped, the form `fuse_attention` reads K
from.
"""

from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.matching import add_const, add_node, private, producer, sole_reader, swap_in
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses


def _static(v: Value | None, rank: int) -> tuple | None:
    """v's shape when it has `rank` axes, all static but the first."""
    s = v.shape if v is not None else None
    if s is None or len(s) != rank or not all(isinstance(d, int) for d in s[1:]):
        return None
    return s


def _bias(b: Value, scores: tuple) -> list[int] | None:
    """The 4-D target of the bias reshape - batch axis 1 (the bias's two leading axes are 1) or -1 (they are the
    scores' own) - or None when it does not fold."""
    s = b.shape
    if s is None or not 2 <= len(s) <= 5 or not all(isinstance(d, int) for d in s[-3:]):
        return None
    full = (1,) * (5 - len(s)) + tuple(s)
    if not all(d in (1, w) for d, w in zip(full[2:], scores[2:])):
        return None
    tail = [int(d) for d in s[-3:]]  # full[2:]
    if full[0] == 1 and full[1] == 1:
        return [1, *tail]
    if full[0] == scores[0] and full[1] == scores[1]:
        return [-1, *tail]
    return None


def _fold(graph: Graph, sm: Node, uses: Uses) -> str | None:
    s5 = sm.inputs[0]
    if s5 is None or s5.rank != 5 or int(sm.attrs["axis"]) not in (-1, 4):
        return None
    mm2 = sole_reader(uses, sm.outputs[0], "MatMul")
    if mm2 is None or mm2.inputs[0] is not sm.outputs[0]:
        return None
    add = producer(s5, "Add")
    bias, first = None, True
    mm1 = producer(s5, "MatMul")
    if add is not None:
        for i in (0, 1):
            cand = producer(add.inputs[i], "MatMul")
            if cand is not None and add.inputs[1 - i] is not None:
                mm1, bias, first = cand, add.inputs[1 - i], i == 0
                break
    if mm1 is None or (add is not None and bias is None):
        return None
    q, kt, v = mm1.inputs[0], mm1.inputs[1], mm2.inputs[1]
    qs, ks, vs, ss = _static(q, 5), _static(kt, 5), _static(v, 5), _static(s5, 5)
    if qs is None or ks is None or vs is None or ss is None:
        return None
    if not (qs[0] == ks[0] == vs[0] == ss[0] and qs[1] == ks[1] == vs[1] and qs[2] == ks[2] == vs[2]):
        return None
    if not private(uses, mm1.outputs[0], add or sm) or (add is not None and not private(uses, add.outputs[0], sm)):
        return None
    bias_target = _bias(bias, ss) if bias is not None else None
    if bias is not None and bias_target is None:
        return None

    def to4(x: Value, shape: tuple, what: str, at: Node = mm1) -> Value:
        """x [B, G, ...] as [B * G, ...], computed just before `at`."""
        target = add_const(graph, f"{at.name}.{what}4", torch.tensor([-1, *shape[2:]], dtype=torch.int64))
        return add_node(graph, at, "Reshape", [x, target], name=f"{at.name}/{what}4")[0]

    q4 = to4(q, qs, "q")  # type: ignore[arg-type]
    t = producer(kt, "Transpose")
    if t is not None and tuple(t.attrs.get("perm") or ()) == (0, 1, 2, 4, 3) and t.inputs[0] is not None:
        # why: K^T as a 4-D transpose of K is the form attention recognition takes K from (no copy of K left)
        k4 = to4(t.inputs[0], (*ks[:3], ks[4], ks[3]), "k")
        (kt4,) = add_node(graph, mm1, "Transpose", [k4], {"perm": (0, 1, 3, 2)}, name=f"{mm1.name}/kt4")
    else:
        kt4 = to4(kt, ks, "kt")  # type: ignore[arg-type]
    (s4,) = add_node(graph, mm2, "MatMul", [q4, kt4], name=f"{mm1.name}/4d")
    if bias is not None and add is not None:
        target = add_const(graph, f"{add.name}.bias4", torch.tensor(bias_target, dtype=torch.int64))
        (b4,) = add_node(graph, mm2, "Reshape", [bias, target], name=f"{add.name}/bias4")
        (s4,) = add_node(graph, mm2, "Add", [s4, b4] if first else [b4, s4], name=f"{add.name}/4d")
    (p4,) = add_node(graph, mm2, "Softmax", [s4], {"axis": -1}, name=f"{sm.name}/4d")
    (y4,) = add_node(graph, mm2, "MatMul", [p4, to4(v, vs, "v", mm2)], name=f"{mm2.name}/4d")  # type: ignore[arg-type]
    out = mm2.outputs[0].shape
    assert out is not None
    back = add_const(graph, f"{mm2.name}.y5", torch.tensor([-1, *out[1:]], dtype=torch.int64))
    (y5,) = add_node(graph, mm2, "Reshape", [y4, back], name=f"{mm2.name}/5d")
    return swap_in(graph, mm2, y5, "attention_5d", [sm, *([add] if add is not None else []), mm1])


def fold_attention_batch(graph: Graph) -> PassResult:
    """5-D attention (MaxViT) on 4-D operands (count: attention_5d)."""
    return apply_rules(graph, [rule("Softmax", _fold)])
