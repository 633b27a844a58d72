"""fuse_attention: Q K^T -> scale -> mask -> Softmax -> V chains become one Attention op (4-D, 3-D packed with
the head split/merge folded in, grouped-query, bool / additive / Where masks), function preserved."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.ir.interpreter import Interpreter
from kiln.passes.fuse_attention import fuse_attention
from tests.passes.pattern_util import ops, rand, rewrite_preserves

B, S, H, D = 2, 5, 4, 8
F32 = DType.FLOAT32


def _c(g: Graph, value, dtype: torch.dtype = torch.float32) -> Value:
    return g.add_initializer(g.fresh_name("c"), torch.tensor(value, dtype=dtype))


def _dim(g: Graph, x: Value, i: int) -> Value:
    """Unsqueeze(Gather(Shape(x), i)): the shape arithmetic exporters emit."""
    (s,) = g.add("Shape", [x])
    (d,) = g.add("Gather", [s, _c(g, i, torch.int64)], {"axis": 0})
    (u,) = g.add("Unsqueeze", [d, _c(g, [0], torch.int64)])
    return u


def _split_heads(g: Graph, x: Value, heads: int, perm: tuple[int, ...] = (0, 2, 1, 3)) -> Value:
    """Reshape x [B, S, H*D] to [B, S, H, D] with a target from Shape -> Gather -> Concat, then Transpose."""
    (target,) = g.add("Concat", [_dim(g, x, 0), _dim(g, x, 1), _c(g, [heads], torch.int64),
                                 _c(g, [-1], torch.int64)], {"axis": 0})
    (r,) = g.add("Reshape", [x, target])
    (t,) = g.add("Transpose", [r], {"perm": perm})
    return t


def _merge_heads(g: Graph, y4: Value) -> Value:
    (t,) = g.add("Transpose", [y4], {"perm": (0, 2, 1, 3)})
    (target,) = g.add("Concat", [_dim(g, t, 0), _dim(g, t, 1), _c(g, [-1], torch.int64)], {"axis": 0})
    (r,) = g.add("Reshape", [t, target], outputs=["y"])
    return r


def bert(*, k_perm: str = "0231", mask: str = "add", probs_output: bool = False, kv_heads: int = H,
         guard: bool = False, flat: bool = False) -> Graph:
    """The HF BERT/GPT-2 export shape on packed q, k, v [B, S, H*D]. `k_perm` "rows": K^T as torch.export spells
    it (`_rows_transposed`); `guard`: torch's SDPA export, its probabilities read through Where(IsNaN(p), 0, p);
    `flat`: the merged heads reshaped to [B*S, H*D] (torch.export's GPT-2, for its Gemm)."""
    g = Graph()
    q = g.add_input("q", TensorType(F32, ("batch", "seq", H * D)))
    k = g.add_input("k", TensorType(F32, ("batch", "seq", kv_heads * D)))
    v = g.add_input("v", TensorType(F32, ("batch", "seq", kv_heads * D)))
    q4 = _split_heads(g, q, H)
    v4 = _split_heads(g, v, kv_heads)
    if k_perm == "0231":
        kt = _split_heads(g, k, kv_heads, (0, 2, 3, 1))
    elif k_perm == "rows":
        k4 = _split_heads(g, k, kv_heads)
        if kv_heads != H:
            v4 = _repeat_kv(g, v4, H // kv_heads)
        kt = _rows_transposed(g, k4, H // kv_heads)
    else:
        k4 = _split_heads(g, k, kv_heads)
        if kv_heads != H:
            k4, v4 = _repeat_kv(g, k4, H // kv_heads), _repeat_kv(g, v4, H // kv_heads)
        (kt,) = g.add("Transpose", [k4], {"perm": (0, 1, 3, 2)})
    (s,) = g.add("MatMul", [q4, kt])
    (s,) = g.add("Mul", [s, _c(g, 1 / math.sqrt(D))])
    if mask == "add":
        m = g.add_input("mask", TensorType(F32, ("batch", 1, "seq", "seq")))
        (s,) = g.add("Add", [s, m])
    (p,) = g.add("Softmax", [s], {"axis": -1})
    if guard:
        (nan,) = g.add("IsNaN", [p])
        (p2,) = g.add("Where", [nan, _c(g, 0.0), p])
    else:
        (p2,) = g.add("Cast", [p], {"to": F32})
    (y4,) = g.add("MatMul", [p2, v4])
    if flat:
        (t,) = g.add("Transpose", [y4], {"perm": (0, 2, 1, 3)})
        (y,) = g.add("Reshape", [t, _c(g, [-1, H * D], torch.int64)], outputs=["y"])
        g.outputs = [y]
    else:
        g.outputs = [_merge_heads(g, y4)]
    if probs_output:
        g.outputs.append(p)
    return g


def _rows_transposed(g: Graph, k4: Value, n: int) -> Value:
    """K^T [B, H, D, S] from k4 [B, Hkv, S, D] as torch.export writes K.transpose(-2, -1) (after the per-head
    repeat of a grouped-query K when n > 1, Unsqueeze + Expand going straight into the 3-D Reshape):
    Reshape(Transpose(Reshape(k4, [-1, S, D]), [0, 2, 1]), [B, H, D, S])."""
    x = k4
    if n > 1:
        (u,) = g.add("Unsqueeze", [k4, _c(g, [2], torch.int64)])
        (shape,) = g.add("Concat", [_dim(g, k4, 0), _c(g, [k4.shape[1], n], torch.int64), _dim(g, k4, 2),
                                    _dim(g, k4, 3)], {"axis": 0})
        (x,) = g.add("Expand", [u, shape])
    (rows,) = g.add("Concat", [_c(g, [-1], torch.int64), _dim(g, k4, 2), _c(g, [D], torch.int64)], {"axis": 0})
    (r,) = g.add("Reshape", [x, rows])
    (t,) = g.add("Transpose", [r], {"perm": (0, 2, 1)})
    (back,) = g.add("Concat", [_dim(g, k4, 0), _c(g, [H, D], torch.int64), _dim(g, k4, 2)], {"axis": 0})
    (kt,) = g.add("Reshape", [t, back])
    return kt


def _repeat_kv(g: Graph, x: Value, n: int) -> Value:
    """HF repeat_kv on [B, Hkv, S, D]: Unsqueeze, Expand, Reshape."""
    (u,) = g.add("Unsqueeze", [x, _c(g, [2], torch.int64)])
    hkv = x.shape[1]
    (shape,) = g.add("Concat", [_dim(g, x, 0), _c(g, [hkv, n], torch.int64), _dim(g, x, 2), _dim(g, x, 3)],
                     {"axis": 0})
    (e,) = g.add("Expand", [u, shape])
    (target,) = g.add("Concat", [_dim(g, x, 0), _c(g, [hkv * n], torch.int64), _dim(g, x, 2), _dim(g, x, 3)],
                      {"axis": 0})
    (r,) = g.add("Reshape", [e, target])
    return r


def _packed_feeds(kv_heads: int = H) -> dict[str, np.ndarray]:
    m = np.zeros((B, 1, S, S), np.float32)
    m[0, :, :, -2:] = np.finfo(np.float32).min  # padding in the first sequence
    return {"q": rand(B, S, H * D, seed=1), "k": rand(B, S, kv_heads * D, seed=2),
            "v": rand(B, S, kv_heads * D, seed=3), "mask": m}


@pytest.mark.parametrize("k_perm", ["0231", "0213+0132"])
def test_bert_shape_becomes_packed_attention(k_perm: str) -> None:
    g, res = rewrite_preserves(lambda: bert(k_perm=k_perm), fuse_attention, _packed_feeds())
    assert ops(g) == ["Attention"] and res.counts == {"attention_packed": 1}
    node = g.nodes[0]
    assert [v.name for v in node.inputs] == ["q", "k", "v", "mask"]
    assert node.attrs["q_num_heads"] == node.attrs["kv_num_heads"] == H
    assert node.attrs["scale"] == pytest.approx(1 / math.sqrt(D))


def test_grouped_query_heads() -> None:
    g, res = rewrite_preserves(lambda: bert(k_perm="0213+0132", kv_heads=2), fuse_attention, _packed_feeds(2))
    assert ops(g) == ["Attention"] and res.counts == {"attention_packed": 1}
    assert g.nodes[0].attrs["q_num_heads"] == H and g.nodes[0].attrs["kv_num_heads"] == 2


@pytest.mark.parametrize("kv_heads", [H, 2])
def test_torch_export_forms_become_packed_attention(kv_heads: int) -> None:
    """torch.export's K^T (a 3-D transpose between reshapes; for grouped-query K straight from the repeat's
    Expand) and SDPA's NaN guard on the probabilities: still one packed Attention, same outputs."""
    g, res = rewrite_preserves(lambda: bert(k_perm="rows", kv_heads=kv_heads, guard=True), fuse_attention,
                               _packed_feeds(kv_heads))
    assert ops(g) == ["Attention"] and res.counts == {"attention_packed": 1}
    assert [v.name for v in g.nodes[0].inputs] == ["q", "k", "v", "mask"]
    assert g.nodes[0].attrs["q_num_heads"] == H and g.nodes[0].attrs["kv_num_heads"] == kv_heads


def test_heads_merged_into_other_rows_still_pack() -> None:
    """The merge's Transpose read by a Reshape to [B*S, H*D]: packed Attention, then [B, S, H, D] rows (a view)."""
    g, res = rewrite_preserves(lambda: bert(flat=True), fuse_attention, _packed_feeds())
    assert ops(g) == ["Attention", "Reshape", "Reshape"] and res.counts == {"attention_packed": 1}
    assert g.nodes[1].outputs[0].shape == ("batch", "seq", H, D)


def test_the_nan_guard_zeroes_what_attention_zeroes() -> None:
    """A -inf mask hiding every key of a row: softmax gives NaN there and the guard 0; Attention gives 0 itself."""
    feeds = _packed_feeds()
    feeds["mask"][1, :, 2, :] = -np.inf  # query 2 of the second sequence sees no key
    feeds["mask"][1, :, 3, 1:] = -np.inf  # query 3 sees one
    before = Interpreter(bert(guard=True)).run(dict(feeds))["y"]
    assert not np.isnan(before).any() and (before[1, 2] == 0).all()
    _g, res = rewrite_preserves(lambda: bert(guard=True), fuse_attention, feeds)
    assert res.counts == {"attention_packed": 1}


def test_a_nan_guard_read_elsewhere_does_not_match() -> None:
    def build() -> Graph:
        g = bert(guard=True)
        where = next(n for n in g.nodes if n.op == "IsNaN")
        g.outputs.append(where.outputs[0])
        return g

    g, res = rewrite_preserves(build, fuse_attention, _packed_feeds())
    assert not res.changed and "Softmax" in ops(g)


def test_probabilities_read_elsewhere_do_not_match() -> None:
    def build() -> Graph:
        return bert(probs_output=True)

    g, res = rewrite_preserves(build, fuse_attention, _packed_feeds())
    assert not res.changed and "Softmax" in ops(g)


def test_shape_readers_of_the_merge_are_rerouted() -> None:
    """GPT-2 reads the merge Transpose's shape for the Reshape target: it still becomes packed."""
    _g, res = rewrite_preserves(bert, fuse_attention, _packed_feeds())
    assert res.counts == {"attention_packed": 1}


def _four_d(*, scale_on: str = "scores", mask: str = "none", k_input: str = "k", heads_k: int = H,
            dtype: DType = F32, softmax32: bool = False, mask_width: str = "seq") -> Graph:
    """4-D Q, K, V inputs [B, H, S, D]."""
    g = Graph()
    q = g.add_input("q", TensorType(dtype, ("batch", H, "seq", D)))
    if k_input == "kt":
        kt = g.add_input("kt", TensorType(dtype, ("batch", heads_k, D, "seq")))
    else:
        k = g.add_input("k", TensorType(dtype, ("batch", heads_k, "seq", D)))
        (kt,) = g.add("Transpose", [k], {"perm": (0, 1, 3, 2)})
    v = g.add_input("v", TensorType(dtype, ("batch", heads_k, "seq", D)))
    tdt = dtype.torch
    if scale_on == "qk":  # torch's SDPA export: Q * sqrt(s), K^T * sqrt(s)
        root = _c(g, math.sqrt(1 / math.sqrt(D)), tdt)
        (q,) = g.add("Mul", [q, root])
        (kt,) = g.add("Mul", [kt, root])
    (s,) = g.add("MatMul", [q, kt])
    if scale_on == "scores":
        (s,) = g.add("Div", [s, _c(g, math.sqrt(D), tdt)])
    if mask in ("where_inf", "where_min", "where_drop"):
        cond = g.add_input("cond", TensorType(DType.BOOL, ("seq", "seq")))
        fill = _c(g, float("-inf") if mask != "where_min" else float(torch.finfo(tdt).min), tdt)
        (s,) = g.add("Where", [cond, s, fill] if mask != "where_drop" else [cond, fill, s])
    elif mask == "add":
        m = g.add_input("mask", TensorType(dtype, ("batch", 1, 1, mask_width)))
        (s,) = g.add("Add", [m, s])
    if softmax32:
        (s,) = g.add("Cast", [s], {"to": F32})
    (p,) = g.add("Softmax", [s], {"axis": 3})
    if softmax32:
        (p,) = g.add("Cast", [p], {"to": dtype})
    (y,) = g.add("MatMul", [p, v], outputs=["y"])
    g.outputs = [y]
    return g


def _four_d_feeds(heads_k: int = H, k_input: str = "k", dtype=np.float32) -> dict[str, np.ndarray]:
    causal = np.tril(np.ones((S, S), bool))
    m = np.zeros((B, 1, 1, S), dtype)
    m[1, ..., -1] = -1e4
    k = rand(B, heads_k, S, D, seed=2)
    k = k if k_input == "k" else k.transpose(0, 1, 3, 2)
    return {"q": rand(B, H, S, D, seed=1).astype(dtype), k_input: k.astype(dtype),
            "v": rand(B, heads_k, S, D, seed=3).astype(dtype), "cond": causal, "mask": m}


def _feeds_for(g: Graph, feeds: dict) -> dict:
    return {v.name: feeds[v.name] for v in g.inputs}


@pytest.mark.parametrize("kw", [{}, {"scale_on": "qk"}, {"scale_on": "none"}, {"mask": "add"},
                                {"mask": "where_inf"}, {"mask": "where_min"}, {"mask": "where_drop"},
                                {"k_input": "kt"}])
def test_four_d_attention(kw) -> None:
    feeds = _feeds_for(_four_d(**kw), _four_d_feeds(k_input=kw.get("k_input", "k")))
    if kw.get("mask") == "where_drop":
        feeds["cond"] = ~feeds["cond"]
    g, res = rewrite_preserves(lambda: _four_d(**kw), fuse_attention, feeds)
    assert res.counts == {"attention": 1} and "Softmax" not in ops(g) and "MatMul" not in ops(g)
    node = next(n for n in g.nodes if n.op == "Attention")
    want = 1.0 if kw.get("scale_on") == "none" else 1 / math.sqrt(D)
    assert node.attrs["scale"] == pytest.approx(want)
    extra = {"where_min": ["Where"], "where_drop": ["Not"]}.get(kw.get("mask", ""), [])
    extra += ["Transpose"] if kw.get("k_input") == "kt" else []
    assert sorted(ops(g)) == sorted(["Attention", *extra])


def test_mask_narrower_than_the_keys_does_not_match() -> None:
    """kiln's Attention pads a mask shorter than the keys with -inf; a [.., 1] mask broadcasts instead."""
    def build() -> Graph:
        return _four_d(mask="add", mask_width=1)

    feeds = _feeds_for(build(), _four_d_feeds())
    feeds["mask"] = feeds["mask"][..., :1]
    _g, res = rewrite_preserves(build, fuse_attention, feeds)
    assert not res.changed


def test_one_kv_head_broadcast_is_multi_query() -> None:
    """K/V with one head broadcast over the query heads by MatMul: the same as kv_num_heads 1."""
    def build() -> Graph:
        return _four_d(heads_k=1)

    _g, res = rewrite_preserves(build, fuse_attention, _feeds_for(build(), _four_d_feeds(heads_k=1)))
    assert res.counts == {"attention": 1}


def test_half_precision_with_float32_softmax() -> None:
    def build() -> Graph:
        return _four_d(dtype=DType.FLOAT16, softmax32=True, mask="add")

    feeds = _feeds_for(build(), _four_d_feeds(dtype=np.float16))
    g, res = rewrite_preserves(build, fuse_attention, feeds, rtol=2e-3, atol=2e-3)
    assert res.counts == {"attention": 1}
    assert g.nodes[0].attrs["softmax_precision"] is DType.FLOAT32


def _causal_graph(form: str) -> Graph:
    """GPT-style: a constant causal triangle (as a folded buffer slice) over static [B, H, S, S] scores."""
    g = Graph()
    q = g.add_input("q", TensorType(F32, (B, H, S, D)))
    k = g.add_input("k", TensorType(F32, (B, H, S, D)))
    v = g.add_input("v", TensorType(F32, (B, H, S, D)))
    (kt,) = g.add("Transpose", [k], {"perm": (0, 1, 3, 2)})
    (s,) = g.add("MatMul", [q, kt])
    (s,) = g.add("Mul", [s, _c(g, 1 / math.sqrt(D))])
    tri = torch.ones(S, S, dtype=torch.bool).tril().reshape(1, 1, S, S)
    if form == "where":
        (s,) = g.add("Where", [g.add_initializer("tri", tri), s, _c(g, float(torch.finfo(torch.float32).min))])
    elif form == "add":
        bias = torch.zeros(1, 1, S, S).masked_fill(~tri, float("-inf"))
        (s,) = g.add("Add", [s, g.add_initializer("bias", bias)])
    else:  # not causal: one key hidden everywhere
        keep = torch.ones(1, 1, S, S, dtype=torch.bool)
        keep[..., 1] = False
        (s,) = g.add("Where", [g.add_initializer("keep", keep), s, _c(g, float("-inf"))])
    (p,) = g.add("Softmax", [s], {"axis": -1})
    (y,) = g.add("MatMul", [p, v], outputs=["y"])
    g.outputs = [y]
    return g


@pytest.mark.parametrize("form", ["where", "add", "other"])
def test_a_constant_causal_triangle_becomes_is_causal(form: str) -> None:
    feeds = {"q": rand(B, H, S, D, seed=1), "k": rand(B, H, S, D, seed=2), "v": rand(B, H, S, D, seed=3)}
    g, res = rewrite_preserves(lambda: _causal_graph(form), fuse_attention, feeds)
    assert res.counts == {"attention": 1}
    node = next(n for n in g.nodes if n.op == "Attention")
    if form == "other":
        assert node.attrs["is_causal"] == 0 and len(node.inputs) == 4
    else:
        assert node.attrs["is_causal"] == 1 and len(node.inputs) == 3 and ops(g) == ["Attention"]


def _swin(*, bias: bool = True, window_batch: int = 1, heads_in_mask: int = 1) -> Graph:
    """Swin's shifted-window attention: q, k, v [B*nW, H, S, D]; the scores plus a relative position bias
    [1, H, S, S], then viewed as [B, nW, H, S, S] for a per-window mask, and back, then softmax."""
    nw, batch = 3, 2
    g = Graph()
    q, k, v = (g.add_input(n, TensorType(F32, (batch * nw, H, S, D))) for n in "qkv")
    (qs,) = g.add("Mul", [q, _c(g, 1 / math.sqrt(D))])
    (kt,) = g.add("Transpose", [k], {"perm": (0, 1, 3, 2)})
    (s,) = g.add("MatMul", [qs, kt])
    if bias:
        (s,) = g.add("Add", [s, _c(g, np.random.default_rng(7).standard_normal((1, H, S, S)).tolist())])
    (s5,) = g.add("Reshape", [s, _c(g, [-1, nw, H, S, S], torch.int64)])
    hide = np.zeros((window_batch, nw, heads_in_mask, S, S), np.float32)
    hide[:, 1, :, :2, 3:] = -100.0  # the shifted windows hide some pairs
    (s5,) = g.add("Add", [s5, g.add_initializer("window_mask", torch.tensor(hide))])
    (s4,) = g.add("Reshape", [s5, _c(g, [-1, H, S, S], torch.int64)])
    (p,) = g.add("Softmax", [s4], {"axis": -1})
    (y,) = g.add("MatMul", [p, v], outputs=["y"])
    g.outputs = [y]
    return g


def _swin_feeds() -> dict[str, np.ndarray]:
    return {n: rand(6, H, S, D, seed=i) for i, n in enumerate("qkv")}


@pytest.mark.parametrize(("bias", "heads_in_mask"), [(True, 1), (False, 1), (True, H)])
def test_shifted_windows_fold_into_heads(bias: bool, heads_in_mask: int) -> None:
    """One Attention over [B, nW*H, S, D] with a [1, nW*H, S, S] mask (window mask + position bias)."""
    g, res = rewrite_preserves(lambda: _swin(bias=bias, heads_in_mask=heads_in_mask), fuse_attention,
                               _swin_feeds())
    assert res.counts == {"attention_windows": 1} and "Softmax" not in ops(g)
    att = next(n for n in g.nodes if n.op == "Attention")
    assert att.inputs[0].shape == (2, 3 * H, S, D) and att.inputs[3].shape == (1, 3 * H, S, S)


def test_a_window_mask_per_image_is_not_folded() -> None:
    _g, res = rewrite_preserves(lambda: _swin(window_batch=2), fuse_attention, _swin_feeds())
    assert not res.changed
