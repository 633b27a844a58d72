"""fuse_rotary: transformers' rotate-half RoPE -> RotaryEmbedding (on the packed input of a head split), with
constant tables and with tables computed from Concat([freqs, freqs])."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.fuse_rotary import fuse_rotary
from tests.passes.pattern_util import ops, rand, rewrite_preserves

B, S, H, D = 2, 5, 3, 8
F32 = DType.FLOAT32


def _c(g: Graph, value, dtype: torch.dtype = torch.float32) -> Value:
    return g.add_initializer(g.fresh_name("c"), torch.tensor(value, dtype=dtype))


def _angles() -> np.ndarray:
    inv = 1.0 / 10000 ** (np.arange(0, D // 2) / (D // 2))
    return np.arange(S)[:, None] * inv[None, :]  # [S, D/2]


def _tables(g: Graph, form: str) -> tuple[Value, Value]:
    """cos, sin [1, 1, S, D]: constants, or computed from the frequencies input f [1, S, D/2] as transformers does."""
    if form == "constant":
        emb = np.concatenate([_angles(), _angles()], -1)[None, None]
        return _c(g, np.cos(emb).astype(np.float32)), _c(g, np.sin(emb).astype(np.float32))
    f = g.add_input("freqs", TensorType(F32, (1, S, D // 2)))
    (emb,) = g.add("Concat", [f, f], {"axis": -1})
    out = []
    for op in ("Cos", "Sin"):
        (t,) = g.add(op, [emb])
        if form == "scaled":  # transformers' attention scaling (1.0 for LLaMA, other values for YaRN ...)
            (t,) = g.add("Mul", [t, _c(g, 0.75)])
        (t,) = g.add("Unsqueeze", [t, _c(g, [1], torch.int64)])
        out.append(t)
    return out[0], out[1]


def _slice(g: Graph, x: Value, start: int, end: int) -> Value:
    (s,) = g.add("Slice", [x, _c(g, [start], torch.int64), _c(g, [end], torch.int64), _c(g, [-1], torch.int64)])
    return s


def llama(*, form: str = "constant", packed: bool = True, order: str = "xc+rs", broken: str = "") -> Graph:
    """q_embed = q * cos + rotate_half(q) * sin, q split from x [B, S, H*D] (packed) or given as [B, H, S, D]."""
    g = Graph()
    if packed:
        x3 = g.add_input("x", TensorType(F32, ("batch", S, H * D)))
        (r,) = g.add("Reshape", [x3, _c(g, [0, 0, H, D], torch.int64)])
        (q,) = g.add("Transpose", [r], {"perm": (0, 2, 1, 3)})
    else:
        q = g.add_input("x", TensorType(F32, ("batch", H, S, D)))
    cos, sin = _tables(g, form)
    half = D // 2
    if broken == "other-sign":  # Concat([x2, -x1]): the inverse rotation's form, not the one matched
        (neg,) = g.add("Neg", [_slice(g, q, 0, half)])
        (rot,) = g.add("Concat", [_slice(g, q, half, 1 << 30), neg], {"axis": -1})
    else:
        (neg,) = g.add("Neg", [_slice(g, q, half, 1 << 30)])
        (rot,) = g.add("Concat", [neg, _slice(g, q, 0, half)], {"axis": -1})
    a = g.add("Mul", [q, cos] if order == "xc+rs" else [cos, q])[0]
    b = g.add("Mul", [rot, sin] if order == "xc+rs" else [sin, rot])[0]
    (y,) = g.add("Add", [a, b] if order == "xc+rs" else [b, a], outputs=["y"])
    g.outputs = [y]
    if broken == "rotated-read":
        g.outputs.append(rot)
    return g


def _feeds(packed: bool = True, form: str = "constant") -> dict[str, np.ndarray]:
    x = {"x": rand(B, S, H * D) if packed else rand(B, H, S, D)}
    return x if form == "constant" else {**x, "freqs": _angles().astype(np.float32)[None]}


@pytest.mark.parametrize("form", ["constant", "computed", "scaled"])
@pytest.mark.parametrize("order", ["xc+rs", "rs+cx"])
def test_rotate_half_on_a_head_split_becomes_packed_rotary(form: str, order: str) -> None:
    g, res = rewrite_preserves(lambda: llama(form=form, order=order), fuse_rotary, _feeds(form=form))
    assert res.counts == {"rotary_packed": 1}
    rope = next(n for n in g.nodes if n.op == "RotaryEmbedding")
    assert rope.inputs[0].name == "x" and rope.attrs["num_heads"] == H
    assert rope.inputs[1].shape == (1, S, D // 2)
    assert "Concat" not in ops(g) or form != "constant"  # the rotate-half Concat is gone (the tables' stays)
    assert "Neg" not in ops(g)


def test_rotate_half_on_heads_first_input() -> None:
    g, res = rewrite_preserves(lambda: llama(packed=False), fuse_rotary, _feeds(packed=False))
    assert res.counts == {"rotary": 1} and ops(g) == ["RotaryEmbedding"]


@pytest.mark.parametrize("form", ["computed", "constant"])
def test_q_and_k_share_one_table(form: str) -> None:
    def build() -> Graph:
        g = llama(form=form)
        x2 = g.add_input("x2", TensorType(F32, ("batch", H, S, D)))
        cos, sin = (n.inputs[1] for n in g.nodes if n.op == "Mul")  # llama's products: (q, cos), (rot, sin)
        (neg,) = g.add("Neg", [_slice(g, x2, D // 2, D)])
        (rot,) = g.add("Concat", [neg, _slice(g, x2, 0, D // 2)], {"axis": -1})
        (a,) = g.add("Mul", [x2, cos])
        (b,) = g.add("Mul", [rot, sin])
        (y2,) = g.add("Add", [a, b], outputs=["y2"])
        g.outputs.append(y2)
        return g

    feeds = {**_feeds(form=form), "x2": rand(B, H, S, D, seed=5)}
    g, res = rewrite_preserves(build, fuse_rotary, feeds)
    assert res.counts == {"rotary_packed": 1, "rotary": 1}
    tables = {n.inputs[i].name for n in g.nodes if n.op == "RotaryEmbedding" for i in (1, 2)}
    assert len(tables) == 2  # one cos table and one sin table for both


@pytest.mark.parametrize("broken", ["other-sign", "rotated-read"])
def test_other_forms_stay(broken: str) -> None:
    _g, res = rewrite_preserves(lambda: llama(broken=broken), fuse_rotary, _feeds())
    assert not res.changed


def test_tables_with_unequal_halves_stay() -> None:
    def build() -> Graph:
        g = llama()
        mul = next(n for n in g.nodes if n.op == "Mul" and n.inputs[0].name == g.nodes[1].outputs[0].name)
        table = np.cos(np.concatenate([_angles(), 2 * _angles()], -1))[None, None].astype(np.float32)
        mul.inputs[1] = _c(g, table)  # cos of other angles in its second half: not a rotation
        return g

    _g, res = rewrite_preserves(build, fuse_rotary, _feeds())
    assert not res.changed


DF = 12  # a head of 12 dims, its first D = 8 rotated (GPT-NeoX's rotary_pct, Phi's partial_rotary_factor)


def neox(*, packed: bool = True, broken: str = "") -> Graph:
    """q_rot, q_pass = q[..., :D], q[..., D:]; q = Concat([q_rot * cos + rotate_half(q_rot) * sin, q_pass])."""
    g = Graph()
    if packed:
        x3 = g.add_input("x", TensorType(F32, ("batch", S, H * DF)))
        (r,) = g.add("Reshape", [x3, _c(g, [0, 0, H, DF], torch.int64)])
        (q,) = g.add("Transpose", [r], {"perm": (0, 2, 1, 3)})
    else:
        q = g.add_input("x", TensorType(F32, ("batch", H, S, DF)))
    cos, sin = _tables(g, "constant")
    q_rot, q_pass = _slice(g, q, 0, D), _slice(g, q, D, 1 << 30)
    (neg,) = g.add("Neg", [_slice(g, q_rot, D // 2, D)])
    (rot,) = g.add("Concat", [neg, _slice(g, q_rot, 0, D // 2)], {"axis": -1})
    (a,) = g.add("Mul", [q_rot, cos])
    (b,) = g.add("Mul", [rot, sin])
    (e,) = g.add("Add", [a, b])
    (y,) = g.add("Concat", [e, q_pass], {"axis": -1}, outputs=["y"])
    g.outputs = [y]
    if broken == "pass-read":
        g.outputs.append(q_pass)
    return g


@pytest.mark.parametrize("packed", [True, False])
def test_partial_rotary_becomes_one_rotary_embedding(packed: bool) -> None:
    feeds = {"x": rand(B, S, H * DF) if packed else rand(B, H, S, DF)}
    g, res = rewrite_preserves(lambda: neox(packed=packed), fuse_rotary, feeds)
    assert res.counts == {("rotary_packed_partial" if packed else "rotary_partial"): 1}
    rope = next(n for n in g.nodes if n.op == "RotaryEmbedding")
    assert rope.inputs[0].name == "x" and rope.attrs["rotary_embedding_dim"] == D
    assert rope.inputs[1].shape == (1, S, D // 2)
    assert not {"Neg", "Slice", "Concat"} & set(ops(g))


def test_partial_rotary_whose_rest_is_read_elsewhere_rotates_only_the_slice() -> None:
    g, res = rewrite_preserves(lambda: neox(packed=False, broken="pass-read"), fuse_rotary,
                               {"x": rand(B, H, S, DF)})
    assert res.counts == {"rotary": 1} and "Concat" in ops(g)
    rope = next(n for n in g.nodes if n.op == "RotaryEmbedding")
    assert not rope.attrs.get("rotary_embedding_dim") and rope.inputs[0].shape[-1] == D


def _pairs_table(g: Graph, heads_axis: int) -> tuple[Value, Value]:
    """cos, sin with each angle twice in a row ([c0, c0, c1, c1, ...]), [1, 1, S, D] or [1, S, 1, D]."""
    twice = np.repeat(_angles(), 2, axis=-1)
    emb = twice[None, None] if heads_axis == 1 else twice[None, :, None]
    return _c(g, np.cos(emb).astype(np.float32)), _c(g, np.sin(emb).astype(np.float32))


def _every_other(g: Graph, x: Value, start: int) -> Value:
    (s,) = g.add("Slice", [x, _c(g, [start], torch.int64), _c(g, [1 << 30], torch.int64), _c(g, [-1], torch.int64),
                           _c(g, [2], torch.int64)])
    return s


def gptj(*, heads_axis: int = 2, partial: bool = True, table: str = "pairs") -> Graph:
    """GPT-J: q [B, S, H, DF] split from x [B, S, H*DF] (heads_axis 2) or given [B, H, S, D]; its first D dims
    rotated by rotate_every_two: Reshape(Concat([Unsqueeze(-q[..., 1::2]), Unsqueeze(q[..., 0::2])], -1))."""
    g = Graph()
    width = DF if partial else D
    if heads_axis == 2:
        x3 = g.add_input("x", TensorType(F32, ("batch", S, H * width)))
        (q,) = g.add("Reshape", [x3, _c(g, [0, 0, H, width], torch.int64)])
    else:
        q = g.add_input("x", TensorType(F32, ("batch", H, S, width)))
    cos, sin = _pairs_table(g, heads_axis)
    if table == "halves":  # equal halves, not pairs: the rotate-half tables, which this rotation does not use
        cos, sin = _tables(g, "constant")
    q_rot = _slice(g, q, 0, D) if partial else q
    (neg,) = g.add("Neg", [_every_other(g, q_rot, 1)])
    (u0,) = g.add("Unsqueeze", [neg, _c(g, [-1], torch.int64)])
    (u1,) = g.add("Unsqueeze", [_every_other(g, q_rot, 0), _c(g, [-1], torch.int64)])
    (cat,) = g.add("Concat", [u0, u1], {"axis": -1})
    shape = [0, 0, H, D] if heads_axis == 2 else [0, H, S, D]
    (rot,) = g.add("Reshape", [cat, _c(g, shape, torch.int64)])
    (a,) = g.add("Mul", [q_rot, cos])
    (b,) = g.add("Mul", [rot, sin])
    (y,) = g.add("Add", [a, b], outputs=["y"] if not partial else 1)
    if partial:
        (y,) = g.add("Concat", [y, _slice(g, q, D, 1 << 30)], {"axis": -1}, outputs=["y"])
    g.outputs = [y]
    return g


@pytest.mark.parametrize("heads_axis,partial", [(2, True), (2, False), (1, False)])
def test_rotate_every_two_becomes_interleaved_rotary(heads_axis: int, partial: bool) -> None:
    width = DF if partial else D
    x = rand(B, S, H * width) if heads_axis == 2 else rand(B, H, S, width)
    g, res = rewrite_preserves(lambda: gptj(heads_axis=heads_axis, partial=partial), fuse_rotary, {"x": x})
    what = ("rotary_packed" if heads_axis == 2 else "rotary") + ("_partial" if partial else "")
    assert res.counts == {what: 1}
    rope = next(n for n in g.nodes if n.op == "RotaryEmbedding")
    assert rope.attrs["interleaved"] == 1 and rope.inputs[1].shape == (1, S, D // 2)
    assert rope.attrs.get("rotary_embedding_dim", 0) == (D if partial else 0)
    assert not {"Neg", "Slice", "Concat", "Unsqueeze"} & set(ops(g))


def test_rotate_every_two_with_rotate_half_tables_stays() -> None:
    _g, res = rewrite_preserves(lambda: gptj(heads_axis=1, partial=False, table="halves"), fuse_rotary,
                                {"x": rand(B, H, S, D)})
    assert not res.changed
