"""Attention, RotaryEmbedding, LinearAttention and FlexAttention: inference and the reference's semantics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ShapeError, UnsupportedError

F32, F16 = DType.FLOAT32, DType.FLOAT16


def _run(op: str, inputs: list[torch.Tensor | None], n_out: int = 1, **attrs: Any) -> list[torch.Tensor]:
    """Build a one-node graph over the given tensors (None: an omitted optional input) and run it."""
    g = Graph()
    vals = [None if x is None else g.add_input(f"in{i}", TensorType(DType.from_torch(x.dtype), x.shape))
            for i, x in enumerate(inputs)]
    outs = g.add(op, vals, attrs, outputs=n_out)
    g.outputs += outs
    return Interpreter(g).run([x for x in inputs if x is not None])


def _types(op: str, types: list[TensorType | None], n_out: int = 1, **attrs: Any) -> list[TensorType]:
    g = Graph()
    vals = [None if t is None else g.add_input(f"in{i}", t) for i, t in enumerate(types)]
    return [v.type for v in g.add(op, vals, attrs, outputs=n_out)]  # type: ignore[misc]


def _qkv(b: int = 2, hq: int = 4, hkv: int = 4, lq: int = 5, lk: int = 5, e: int = 8, ev: int = 8,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = ((b, hq, lq, e), (b, hkv, lk, e), (b, hkv, lk, ev))
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in shapes)
    return q, k, v


# --- Attention: reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [0, 1])
def test_attention_matches_torch_sdpa_with_gqa(causal: int) -> None:
    q, k, v = _qkv(hq=6, hkv=2, lk=5)
    (y,) = _run("Attention", [q, k, v], is_causal=causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), enable_gqa=True)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_attention_3d_with_float_mask_and_scale_matches_sdpa() -> None:
    q, k, v = _qkv(hq=2, hkv=2, lq=3, lk=7, ev=4)
    mask = torch.randn(3, 7)
    q3, k3, v3 = (x.transpose(1, 2).reshape(2, x.shape[2], -1) for x in (q, k, v))
    (y,) = _run("Attention", [q3, k3, v3, mask], q_num_heads=2, kv_num_heads=2, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2).reshape(2, 3, 8)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_attention_past_and_present_offset_causal() -> None:
    """With a past cache of P keys, query i attends keys j <= P + i (bottom-right alignment)."""
    q, k, v = _qkv(lq=2, lk=2)
    pk, pv = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)
    y, present_k, present_v, qk = _run("Attention", [q, k, v, None, pk, pv], n_out=4, is_causal=1,
                                       qk_matmul_output_mode=2)
    full_k, full_v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    torch.testing.assert_close(present_k, full_k)
    torch.testing.assert_close(present_v, full_v)
    allowed = torch.arange(5)[None, :] <= torch.arange(2)[:, None] + 3
    want = F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=allowed)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(qk[..., 0, 4]).all() and torch.isfinite(qk[..., 1, :]).all()


def test_attention_nonpad_kv_seqlen_external_cache_decode() -> None:
    """One decode query per batch over a static cache: it sees exactly keys [0, nonpad[b])."""
    q, k, v = _qkv(lq=1, lk=6)
    nonpad = torch.tensor([2, 5])
    (y,) = _run("Attention", [q, k, v, None, None, None, nonpad], is_causal=1)
    for b, n in enumerate(nonpad.tolist()):
        want = F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        torch.testing.assert_close(y[b:b + 1], want, rtol=1e-5, atol=1e-5)


def test_attention_sliding_window() -> None:
    q, k, v = _qkv(lq=6, lk=6)
    (y,) = _run("Attention", [q, k, v], left_window_size=2, right_window_size=1)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    allowed = (j >= i - 2) & (j <= i + 1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_attention_fully_masked_row_is_zero_and_short_mask_is_padded() -> None:
    q, k, v = _qkv(lq=2, lk=4)
    mask = torch.tensor([[False, False], [True, False]])  # covers 2 of 4 keys; the rest are masked
    y, _, _, probs = _run("Attention", [q, k, v, mask], n_out=4, qk_matmul_output_mode=3)
    assert (y[:, :, 0] == 0).all() and (probs[:, :, 0] == 0).all()
    torch.testing.assert_close(y[:, :, 1], v[:, :, 0])
    torch.testing.assert_close(probs[:, :, 1, 0], torch.ones(2, 4))


def test_attention_qk_output_modes_and_softcap() -> None:
    q, k, v = _qkv(lq=3, lk=3)
    mask = torch.randn(3, 3)
    raw = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    capped = 2.0 * torch.tanh(raw / 2.0)
    for mode, want in enumerate((raw, capped, capped + mask, torch.softmax(capped + mask, -1))):
        out = _run("Attention", [q, k, v, mask], n_out=4, softcap=2.0, qk_matmul_output_mode=mode)
        torch.testing.assert_close(out[3], want, rtol=1e-5, atol=1e-5)


def test_attention_half_with_float32_softmax() -> None:
    q, k, v = _qkv(dtype=torch.float16)
    y, _, _, probs = _run("Attention", [q, k, v], n_out=4, softmax_precision=F32, qk_matmul_output_mode=3)
    assert y.dtype == probs.dtype == torch.float16
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(y.float(), want, rtol=2e-3, atol=2e-3)


# --- Attention: inference ------------------------------------------------------------------------------


def test_attention_infer_3d_symbolic_with_past() -> None:
    t = [TensorType(F16, ("B", "L", 64)), TensorType(F16, ("B", "S", 32)), TensorType(F16, ("B", "S", 48)),
         None, TensorType(F16, ("B", 2, "P", 16)), TensorType(F16, ("B", 2, "P", 24))]
    y, pk, pv, qk = _types("Attention", t, 4, q_num_heads=4, kv_num_heads=2)
    assert y == TensorType(F16, ("B", "L", 96))
    assert pk.shape == ("B", 2, "P+S", 16) and pv.shape == ("B", 2, "P+S", 24)
    assert qk.shape == ("B", 4, "L", "P+S")


def test_attention_infer_unknown_rank() -> None:
    t = [TensorType(F32, None)] * 3
    types = _types("Attention", t, 4)
    assert all(x.shape is None and x.dtype is F32 for x in types)


def test_attention_infer_errors() -> None:
    t3 = [TensorType(F32, ("B", "L", 64))] * 3
    with pytest.raises(ShapeError, match="q_num_heads and kv_num_heads"):
        _types("Attention", t3)
    with pytest.raises(ShapeError, match="multiple"):
        _types("Attention", t3, q_num_heads=4, kv_num_heads=3)
    t4 = [TensorType(F32, (1, 6, 2, 8)), TensorType(F32, (1, 4, 2, 8)), TensorType(F32, (1, 4, 2, 8))]
    with pytest.raises(ShapeError, match="multiple"):
        _types("Attention", t4)
    with pytest.raises(ShapeError, match="together"):
        _types("Attention", t4[:1] * 3 + [None, TensorType(F32, (1, 6, 1, 8))])
    with pytest.raises(UnsupportedError, match="qk_matmul_output_mode"):
        _types("Attention", t4[:1] * 3, qk_matmul_output_mode=4)


# --- RotaryEmbedding -----------------------------------------------------------------------------------


def _rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE as complex multiplication on x [B, S, H, D] with cos/sin [B, S, D/2]."""
    if interleaved:
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    else:
        z = torch.complex(*x.chunk(2, -1))
    z = z * torch.complex(cos, sin)[:, :, None]
    if interleaved:
        return torch.view_as_real(z).flatten(-2)
    return torch.cat([z.real, z.imag], -1)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_matches_complex_rotation(interleaved: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g)  # [B, H, S, D]
    theta = torch.rand(10, 4, generator=g) * 6
    pos = torch.tensor([[0, 1, 2, 3, 4], [9, 7, 5, 3, 1]])
    (y,) = _run("RotaryEmbedding", [x, theta.cos(), theta.sin(), pos], interleaved=interleaved)
    want = _rope_complex(x.transpose(1, 2), theta.cos()[pos], theta.sin()[pos], bool(interleaved))
    torch.testing.assert_close(y, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_rotary_partial_3d_equals_4d() -> None:
    g = torch.Generator().manual_seed(1)
    x4 = torch.randn(2, 3, 5, 8, generator=g)
    cos, sin = torch.rand(2, 5, 2, generator=g), torch.rand(2, 5, 2, generator=g)
    (y4,) = _run("RotaryEmbedding", [x4, cos, sin], rotary_embedding_dim=4)
    x3 = x4.transpose(1, 2).reshape(2, 5, 24)
    (y3,) = _run("RotaryEmbedding", [x3, cos, sin], rotary_embedding_dim=4, num_heads=3)
    torch.testing.assert_close(y3, y4.transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(y4[..., 4:], x4[..., 4:])


def test_rotary_infer() -> None:
    x = TensorType(F16, ("B", "S", 64))
    cs = TensorType(F16, ("P", 8))
    (y,) = _types("RotaryEmbedding", [x, cs, cs, TensorType(DType.INT64, ("B", "S"))], num_heads=4,
                  rotary_embedding_dim=16)
    assert y == x
    with pytest.raises(ShapeError, match="num_heads"):
        _types("RotaryEmbedding", [x, TensorType(F16, ("B", "S", 8)), TensorType(F16, ("B", "S", 8))])
    with pytest.raises(ShapeError, match="rank 2"):
        _types("RotaryEmbedding", [x, TensorType(F16, ("B", "S", 8)), cs, TensorType(DType.INT64, ("B", 9))],
               num_heads=4)


# --- LinearAttention -----------------------------------------------------------------------------------


def test_linear_attention_linear_rule_is_causal_unnormalized_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, n, generator=g) for n in (2 * 4, 4, 3))
    out, state = _run("LinearAttention", [q, k, v], 2, q_num_heads=2, kv_num_heads=1, update_rule="linear")
    q4 = q.reshape(2, 5, 2, 4).transpose(1, 2)
    scores = (q4 @ k[:, None].transpose(-1, -2)).tril() * 0.5  # 1/sqrt(d_k=4)
    want = (scores @ v[:, None]).transpose(1, 2).reshape(2, 5, 6)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, (k.transpose(1, 2) @ v)[:, None], rtol=1e-5, atol=1e-5)


def test_linear_attention_gated_delta_chunks_compose() -> None:
    """Running T steps at once equals running them in two calls that pass the state along."""
    g = torch.Generator().manual_seed(2)
    b, t, h, dk, dv = 1, 6, 2, 4, 3
    q, k, v = (torch.randn(b, t, h * d, generator=g) for d in (dk, dk, dv))
    k = F.normalize(k.reshape(b, t, h, dk), dim=-1).reshape(b, t, h * dk)
    decay, beta = -torch.rand(b, t, h, generator=g), torch.rand(b, t, 1, generator=g)
    attrs = dict(q_num_heads=h, kv_num_heads=h, update_rule="gated_delta")
    full, s_full = _run("LinearAttention", [q, k, v, None, decay, beta], 2, **attrs)
    head = [x[:, :4] for x in (q, k, v, decay, beta)]
    tail = [x[:, 4:] for x in (q, k, v, decay, beta)]
    first, s1 = _run("LinearAttention", [*head[:3], None, *head[3:]], 2, **attrs)
    second, s2 = _run("LinearAttention", [*tail[:3], s1, *tail[3:]], 2, **attrs)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_full, rtol=1e-5, atol=1e-5)


def test_linear_attention_infer() -> None:
    t = [TensorType(F16, ("B", "T", 64)), TensorType(F16, ("B", "T", 32)), TensorType(F16, ("B", "T", 48)),
         TensorType(F32, ("B", 2, 16, 24))]
    out, state = _types("LinearAttention", t, 2, q_num_heads=4, kv_num_heads=2, update_rule="linear")
    assert out == TensorType(F16, ("B", "T", 96)) and state == TensorType(F32, ("B", 2, 16, 24))
    with pytest.raises(ShapeError, match="needs decay"):
        _types("LinearAttention", t, 2, q_num_heads=4, kv_num_heads=2, update_rule="gated")
    with pytest.raises(UnsupportedError, match="update_rule"):
        _types("LinearAttention", t, 2, q_num_heads=4, kv_num_heads=2, update_rule="mamba")


# --- FlexAttention (through the ONNX importer: its modifiers are subgraphs) ------------------------------


def _flex_model(score_bias: float | None, prob_scale: float | None) -> onnx.ModelProto:
    def mod(name: str, value: float, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["x", "c"], ["y"])], name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "H", "L", "S"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "H", "L", "S"])],
            [helper.make_tensor("c", TensorProto.FLOAT, [], [value])])

    attrs: dict[str, Any] = {}
    if score_bias is not None:
        attrs["score_mod"] = mod("score", score_bias, "Add")
    if prob_scale is not None:
        attrs["prob_mod"] = mod("prob", prob_scale, "Mul")
    node = helper.make_node("FlexAttention", ["Q", "K", "V"], ["Y"], domain="ai.onnx.preview", **attrs)
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
           for n, s in (("Q", [1, 4, 3, 8]), ("K", [1, 2, 5, 8]), ("V", [1, 2, 5, 6]))]
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26),
                                                   helper.make_opsetid("ai.onnx.preview", 1)])


def test_flex_attention_modifiers() -> None:
    q, k, v = _qkv(b=1, hq=4, hkv=2, lq=3, lk=5, ev=6)
    feeds = {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy()}
    plain = Interpreter(import_model(_flex_model(None, None))).run(feeds)["Y"]
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).numpy()
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-5)
    shifted = Interpreter(import_model(_flex_model(3.0, None))).run(feeds)["Y"]
    np.testing.assert_allclose(shifted, plain, rtol=1e-5, atol=1e-5)  # softmax ignores a constant shift
    halved = Interpreter(import_model(_flex_model(None, 0.5))).run(feeds)["Y"]
    np.testing.assert_allclose(halved, plain * 0.5, rtol=1e-5, atol=1e-6)


def test_flex_attention_rejects_unknown_attribute() -> None:
    model = _flex_model(None, None)
    model.graph.node[0].attribute.append(helper.make_attribute("block_mask", 1))
    with pytest.raises(UnsupportedError, match="block_mask"):
        import_model(model)
