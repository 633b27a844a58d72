"""Op table entries: attention (Attention, FlexAttention, LinearAttention) and RotaryEmbedding.

These references define the semantics the fused GPU kernels are checked against, so each step's precision is
spelled out:
- matmuls take T1 operands and accumulate in float32 (float64 for double), rounding the result to T1;
- `Attention` scales Q and K by sqrt(scale) rounded to T1 before QK^T (as ONNX specifies, against overflow),
  applies softcap in T1, adds the mask bias, runs softmax in `softmax_precision` (default T1), zeroes fully
  masked rows, rounds the probabilities to T1 and multiplies by V;
- `FlexAttention` runs its score/prob modifiers and softmax in `softmax_precision` (default float32, float64
  for double inputs); `LinearAttention` runs its recurrence in float32; RotaryEmbedding computes
  float16/bfloat16 in float32 and rounds once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Shape, TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register

Tensor = torch.Tensor
_FLOATS = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64)
_HALF = (torch.float16, torch.bfloat16)
NEG_INF = float("-inf")


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with float32 accumulation for half types; the result has a's dtype."""
    if a.dtype in _HALF:
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b.to(a.dtype)


def softmax(x: Tensor) -> Tensor:
    """Softmax over the last axis in x's own precision: each step (x - max, exp, sum, divide) rounds to
    x's dtype, as a softmax computed in that type does."""
    e = torch.exp(x - x.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, S, H*D] -> [B, H, S, D]."""
    b, s, hd = x.shape
    if hd % heads:
        raise ValueError(f"hidden size {hd} is not a multiple of {heads} heads")
    return x.reshape(b, s, heads, hd // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, S, D] -> [B, S, H*D]."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def expand_kv_heads(x: Tensor, q_heads: int) -> Tensor:
    """Grouped-query attention: query head h reads kv head h // (q_heads / kv_heads)."""
    kv_heads = x.shape[1]
    if kv_heads == q_heads:
        return x
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q_num_heads ({q_heads}) must be a multiple of kv_num_heads ({kv_heads})")
    return x.repeat_interleave(q_heads // kv_heads, dim=1)


# --- shared inference helpers -------------------------------------------------------------------------


def _shape_or_fresh(ctx: InferCtx, i: int, rank: int, hint: str) -> Shape:
    s = ctx.shape(i) if ctx.has(i) else None
    if s is None:
        return tuple(ctx.fresh(f"{hint}{k}") for k in range(rank))
    if len(s) != rank:
        raise ctx.error(f"input {i} must have rank {rank}, got shape {list(s)}")
    return s


def _heads_dim(ctx: InferCtx, hidden: sym.Dim, heads: int, what: str) -> sym.Dim:
    if heads <= 0:
        raise ctx.error(f"{what}: the number of heads must be positive, got {heads}")
    if isinstance(hidden, int) and hidden % heads:
        raise ctx.error(f"{what}: hidden size {hidden} is not a multiple of {heads} heads")
    return sym.floordiv(hidden, heads)


def _same_dim(ctx: InferCtx, a: sym.Dim, b: sym.Dim, what: str) -> sym.Dim:
    if isinstance(a, int) and isinstance(b, int) and a != b:
        raise ctx.error(f"{what} disagree: {a} vs {b}")
    return a if isinstance(a, int) else b


def _float_dtype(ctx: InferCtx, i: int, what: str) -> DType:
    dt = ctx.dtype(i)
    if dt not in _FLOATS:
        raise ctx.error(f"{what} must be float32, float16, bfloat16 or float64, got {dt}")
    return dt


# --- Attention ----------------------------------------------------------------------------------------


def _attention_infer(ctx: InferCtx) -> list[TensorType]:
    a = ctx.attrs
    t1 = _float_dtype(ctx, 0, "Q")
    if ctx.dtype(1) is not t1:
        raise ctx.error(f"K must have Q's dtype {t1}, got {ctx.dtype(1)}")
    t2 = _float_dtype(ctx, 2, "V")
    _check_attention_inputs(ctx, t1, t2)
    rank = next((r for r in (ctx.rank(0), ctx.rank(1), ctx.rank(2)) if r is not None), None)
    if rank is None:
        return [TensorType(t1, None), TensorType(t1, None), TensorType(t2, None), TensorType(t1, None)]
    if rank not in (3, 4):
        raise ctx.error(f"Q, K and V must have rank 3 or 4, got rank {rank}")
    q, k, v = (_shape_or_fresh(ctx, i, rank, n) for i, n in ((0, "q"), (1, "k"), (2, "v")))
    batch = _same_dim(ctx, _same_dim(ctx, q[0], k[0], "batch sizes of Q and K"), v[0], "batch sizes of V")
    if rank == 4:
        hq, lq, e = q[1], q[2], q[3]
        hkv = _same_dim(ctx, k[1], v[1], "head counts of K and V")
        s, ev = _same_dim(ctx, k[2], v[2], "sequence lengths of K and V"), v[3]
        _same_dim(ctx, e, k[3], "head sizes of Q and K")
        for attr, dim in (("q_num_heads", hq), ("kv_num_heads", hkv)):
            if a[attr] is not None and isinstance(dim, int) and a[attr] != dim:
                raise ctx.error(f"{attr}={a[attr]} disagrees with the 4-D inputs' {dim} heads")
    else:
        if a["q_num_heads"] is None or a["kv_num_heads"] is None:
            raise ctx.error("3-D Q, K and V need the q_num_heads and kv_num_heads attributes")
        hq, hkv = a["q_num_heads"], a["kv_num_heads"]
        lq, s = q[1], _same_dim(ctx, k[1], v[1], "sequence lengths of K and V")
        e = _heads_dim(ctx, q[2], hq, "Q")
        _same_dim(ctx, e, _heads_dim(ctx, k[2], hkv, "K"), "head sizes of Q and K")
        ev = _heads_dim(ctx, v[2], hkv, "V")
    if isinstance(hq, int) and isinstance(hkv, int) and (hkv <= 0 or hq % hkv):
        raise ctx.error(f"q_num_heads ({hq}) must be a multiple of kv_num_heads ({hkv})")
    total = s
    if ctx.has(4):
        past = _shape_or_fresh(ctx, 4, 4, "past")
        total = sym.add(past[2], s)
    y = (batch, hq, lq, ev) if rank == 4 else (batch, lq, sym.mul(hq, ev))
    return [TensorType(t1, y), TensorType(t1, (batch, hkv, total, e)),
            TensorType(t2, (batch, hkv, total, ev)), TensorType(t1, (batch, hq, lq, total))]


def _check_attention_inputs(ctx: InferCtx, t1: DType, t2: DType) -> None:
    a = ctx.attrs
    if ctx.has(4) != ctx.has(5):
        raise ctx.error("past_key and past_value must be given together")
    if ctx.has(4) and ctx.has(6):
        raise ctx.error("nonpad_kv_seqlen cannot be combined with past_key/past_value")
    if ctx.has(6) and ctx.dtype(6) is not DType.INT64:
        raise ctx.error(f"nonpad_kv_seqlen must be int64, got {ctx.dtype(6)}")
    if ctx.has(3):
        mt = ctx.dtype(3)
        if not (mt is DType.BOOL or mt.is_int or mt in _FLOATS):
            raise ctx.error(f"attn_mask must be bool, an integer or a float type, got {mt}")
    if ctx.has(4) and (ctx.dtype(4) is not t1 or ctx.dtype(5) is not t2):
        raise ctx.error(f"past_key/past_value must be {t1}/{t2}, got {ctx.dtype(4)}/{ctx.dtype(5)}")
    sp = a["softmax_precision"]
    if sp is not None and sp not in _FLOATS:
        raise ctx.error(f"softmax_precision must be float32, float16, float64 or bfloat16, got {sp}")
    for side in ("left_window_size", "right_window_size"):
        if a[side] < -1:
            raise ctx.error(f"{side} must be -1 (unbounded) or nonnegative, got {a[side]}")
    if a["softcap"] < 0:
        raise ctx.error(f"softcap must be nonnegative, got {a['softcap']}")


def attention_bias(attrs: dict[str, Any], mask: Tensor | None, nonpad: Tensor | None, past_len: int,
                   q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """The additive bias (0 or -inf, plus a float mask) broadcastable to [batch, heads, q_len, kv_len].

    Query i sits at absolute position i + offset: offset is past_len with a past cache, nonpad[b] - q_len with
    an external cache (nonpad_kv_seqlen), else 0. is_causal allows keys j <= i + offset; the windows allow
    i + offset - left <= j <= i + offset + right; nonpad_kv_seqlen disallows keys j >= nonpad[b].
    """
    bias = None if mask is None else _mask_bias(mask, kv_len, dtype)
    allowed = _allowed_keys(attrs, nonpad, past_len, q_len, kv_len, device)
    if allowed is None:
        return bias
    structural = torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, NEG_INF)
    return structural if bias is None else bias + structural


def _mask_bias(mask: Tensor, kv_len: int, dtype: torch.dtype) -> Tensor:
    """attn_mask as an additive bias: bool True -> 0, False -> -inf; numbers are added as they are. A mask
    shorter than kv_len is padded with -inf."""
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, NEG_INF)
    else:
        bias = mask.to(dtype)
    width = bias.shape[-1] if bias.dim() else 1
    if width > kv_len:
        raise ValueError(f"attn_mask covers {width} keys, more than the {kv_len} keys of K")
    if bias.dim() and width < kv_len:
        bias = torch.nn.functional.pad(bias, (0, kv_len - width), value=NEG_INF)
    return bias


def _allowed_keys(attrs: dict[str, Any], nonpad: Tensor | None, past_len: int, q_len: int,
                  kv_len: int, device: torch.device) -> Tensor | None:
    """Boolean [batch or 1, 1, q_len, kv_len] of the keys each query may see, or None when all are allowed."""
    causal, left, right = attrs["is_causal"], attrs["left_window_size"], attrs["right_window_size"]
    if not causal and left < 0 and right < 0 and nonpad is None:
        return None
    offset = (nonpad.long() - q_len).reshape(-1, 1, 1, 1) if nonpad is not None else past_len
    query_pos = torch.arange(q_len, device=device).reshape(q_len, 1) + offset
    key = torch.arange(kv_len, device=device).reshape(1, kv_len)
    diff = query_pos - key  # how far key j lies behind query i
    allowed = torch.ones(diff.shape, dtype=torch.bool, device=device)
    if causal:
        allowed &= diff >= 0
    if left >= 0:
        allowed &= diff <= left
    if right >= 0:
        allowed &= diff >= -right
    if nonpad is not None:
        allowed = allowed & (key < nonpad.long().reshape(-1, 1, 1, 1))
    return allowed.reshape(-1, 1, q_len, kv_len)


def _attention_ref(c: RefCtx, xs: list[Any]) -> list[Tensor]:
    a = c.attrs
    Q, K, V, mask, past_k, past_v, nonpad = xs + [None] * (7 - len(xs))
    packed = Q.dim() == 3
    if packed:
        Q = split_heads(Q, a["q_num_heads"])
        K, V = split_heads(K, a["kv_num_heads"]), split_heads(V, a["kv_num_heads"])
    present_k = K if past_k is None else torch.cat([past_k, K], dim=2)
    present_v = V if past_v is None else torch.cat([past_v, V], dim=2)
    q_heads, q_len, head_size = Q.shape[1], Q.shape[2], Q.shape[3]
    kv_len = present_k.shape[2]
    if nonpad is not None and nonpad.shape != (Q.shape[0],):
        raise ValueError(f"nonpad_kv_seqlen must have shape [{Q.shape[0]}], got {list(nonpad.shape)}")
    bias = attention_bias(a, mask, nonpad, 0 if past_k is None else past_k.shape[2], q_len, kv_len, Q.dtype,
                          Q.device)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(head_size)
    root = torch.full((), math.sqrt(scale), dtype=Q.dtype, device=Q.device)  # why: no host copy (capturable)
    keys = expand_kv_heads(present_k, q_heads)
    raw = matmul(Q * root, (keys * root).transpose(-1, -2))
    capped = raw if a["softcap"] <= 0 else a["softcap"] * torch.tanh(raw / a["softcap"])
    scores = capped if bias is None else capped + bias
    sm_dtype = a["softmax_precision"].torch if a["softmax_precision"] is not None else Q.dtype
    probs = softmax(scores.to(sm_dtype))
    if bias is not None:  # a row with no attendable key gives zeros, not NaN
        probs = probs.masked_fill(torch.isneginf(bias).all(dim=-1, keepdim=True), 0.0)
    probs = probs.to(Q.dtype)
    Y = matmul(probs, expand_kv_heads(present_v, q_heads))
    qk = (raw, capped, scores, probs)[a["qk_matmul_output_mode"]]
    qk = qk.expand(Q.shape[0], q_heads, q_len, kv_len).contiguous()
    return [merge_heads(Y) if packed else Y, present_k.contiguous(), present_v.contiguous(), qk]


register(
    "Attention",
    inputs=["Q", "K", "V", "attn_mask?", "past_key?", "past_value?", "nonpad_kv_seqlen?"],
    outputs=["Y", "present_key?", "present_value?", "qk_matmul_output?"],
    attrs={
        "is_causal": Attr(AttrKind.INT, 0, choices=(0, 1)),
        "kv_num_heads": Attr(AttrKind.INT, None, doc="needed for 3-D inputs"),
        "q_num_heads": Attr(AttrKind.INT, None, doc="needed for 3-D inputs"),
        "qk_matmul_output_mode": Attr(AttrKind.INT, 0, choices=(0, 1, 2, 3),
                                      doc="0 raw QK^T, 1 after softcap, 2 plus mask bias, 3 softmax"),
        "scale": Attr(AttrKind.FLOAT, None, doc="default 1/sqrt(head_size)"),
        "softcap": Attr(AttrKind.FLOAT, 0.0, doc="0: no soft capping"),
        "softmax_precision": Attr(AttrKind.DTYPE, None, doc="default: Q's dtype"),
        "left_window_size": Attr(AttrKind.INT, -1, doc="-1: unbounded"),
        "right_window_size": Attr(AttrKind.INT, -1, doc="-1: unbounded"),
    },
    infer=_attention_infer, ref=_attention_ref,
    doc="Scaled dot-product attention (MHA/GQA/MQA) with masks, KV cache, softcap and sliding windows.",
)


# --- RotaryEmbedding ----------------------------------------------------------------------------------


def _rotary_infer(ctx: InferCtx) -> list[TensorType]:
    a = ctx.attrs
    dt = ctx.dtype(0)
    if dt not in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16):
        raise ctx.error(f"X must be float32, float16 or bfloat16, got {dt}")
    for i, what in ((1, "cos_cache"), (2, "sin_cache")):
        if ctx.dtype(i) is not dt:
            raise ctx.error(f"{what} must have X's dtype {dt}, got {ctx.dtype(i)}")
        want = 2 if ctx.has(3) else 3
        if ctx.rank(i) is not None and ctx.rank(i) != want:
            how = "with" if ctx.has(3) else "without"
            raise ctx.error(f"{what} must have rank {want} {how} position_ids, got rank {ctx.rank(i)}")
    if ctx.has(3) and ctx.dtype(3) is not DType.INT64:
        raise ctx.error(f"position_ids must be int64, got {ctx.dtype(3)}")
    x = ctx.shape(0)
    if x is not None:
        if len(x) not in (3, 4):
            raise ctx.error(f"X must have rank 3 or 4, got shape {list(x)}")
        if len(x) == 3 and not a["num_heads"]:
            raise ctx.error("a 3-D X needs the num_heads attribute")
        if len(x) == 4 and a["num_heads"] and isinstance(x[1], int) and x[1] != a["num_heads"]:
            raise ctx.error(f"num_heads={a['num_heads']} disagrees with X's {x[1]} heads")
        head = x[3] if len(x) == 4 else _heads_dim(ctx, x[2], a["num_heads"], "X")
        rot = a["rotary_embedding_dim"] or head
        if isinstance(rot, int) and (rot <= 0 or rot % 2 or (isinstance(head, int) and rot > head)):
            raise ctx.error(f"rotary_embedding_dim {rot} must be positive, even and <= the head size {head}")
    return [TensorType(dt, x)]


def _rotary_ref(c: RefCtx, xs: list[Any]) -> list[Tensor]:
    a = c.attrs
    X, cos, sin, pos = xs + [None] * (4 - len(xs))
    cdt = _opmath(X.dtype)
    x = X.transpose(1, 2) if X.dim() == 4 else X.reshape(X.shape[0], X.shape[1], a["num_heads"], -1)
    x = x.to(cdt)  # [batch, seq, heads, head_size]
    rot_dim = a["rotary_embedding_dim"] or x.shape[-1]
    if pos is not None:
        lo, hi = (int(pos.min()), int(pos.max())) if pos.numel() else (0, 0)
        if lo < 0 or hi >= cos.shape[0]:
            raise ValueError(f"position_ids must lie in [0, {cos.shape[0]}), got values in [{lo}, {hi}]")
        cos, sin = cos[pos], sin[pos]
    if cos.shape[-1] != rot_dim // 2 or sin.shape[-1] != rot_dim // 2:
        raise ValueError(f"cos/sin caches have {cos.shape[-1]}/{sin.shape[-1]} columns, rotating {rot_dim} "
                         f"dims needs {rot_dim // 2}")
    cos, sin = cos.to(cdt).unsqueeze(2), sin.to(cdt).unsqueeze(2)
    rot, keep = x[..., :rot_dim], x[..., rot_dim:]
    if a["interleaved"]:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot.chunk(2, dim=-1)
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if a["interleaved"]:
        rot = torch.stack((real, imag), dim=-1).flatten(-2)
    else:
        rot = torch.cat((real, imag), dim=-1)
    y = torch.cat((rot, keep), dim=-1)
    y = y.transpose(1, 2) if X.dim() == 4 else y.reshape(X.shape)
    return [y.to(X.dtype).contiguous()]


register(
    "RotaryEmbedding", inputs=["X", "cos_cache", "sin_cache", "position_ids?"], outputs=["Y"],
    attrs={
        "interleaved": Attr(AttrKind.INT, 0, choices=(0, 1), doc="rotate (even, odd) pairs, not halves"),
        "num_heads": Attr(AttrKind.INT, None, doc="needed for 3-D X"),
        "rotary_embedding_dim": Attr(AttrKind.INT, 0, doc="0: the whole head"),
    },
    infer=_rotary_infer, ref=_rotary_ref,
    doc="Rotary positional embedding (RoPE) of X [B, H, S, D] or [B, S, H*D].",
)


# --- LinearAttention ----------------------------------------------------------------------------------

_RULES = ("linear", "gated", "delta", "gated_delta")
_GATED = ("gated", "gated_delta")
_DELTA = ("delta", "gated_delta")


def _linear_attention_infer(ctx: InferCtx) -> list[TensorType]:
    a = ctx.attrs
    rule, hq, hkv = a["update_rule"], a["q_num_heads"], a["kv_num_heads"]
    if hq <= 0 or hkv <= 0 or hq % hkv:
        raise ctx.error(f"q_num_heads ({hq}) must be a positive multiple of kv_num_heads ({hkv})")
    if ctx.has(4) != (rule in _GATED):
        raise ctx.error(f"update_rule '{rule}' {'needs' if rule in _GATED else 'takes no'} decay input")
    if ctx.has(5) != (rule in _DELTA):
        raise ctx.error(f"update_rule '{rule}' {'needs' if rule in _DELTA else 'takes no'} beta input")
    t = ctx.dtype(0)
    if t not in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16):
        raise ctx.error(f"query must be float32, float16 or bfloat16, got {t}")
    for i in (1, 2, 4, 5):
        if ctx.has(i) and ctx.dtype(i) is not t:
            raise ctx.error(f"input {i} must have query's dtype {t}, got {ctx.dtype(i)}")
    s_dt = ctx.dtype(3) if ctx.has(3) else t
    q, k, v = (_shape_or_fresh(ctx, i, 3, n) for i, n in ((0, "q"), (1, "k"), (2, "v")))
    batch = _same_dim(ctx, _same_dim(ctx, q[0], k[0], "batch sizes"), v[0], "batch sizes")
    steps = _same_dim(ctx, _same_dim(ctx, q[1], k[1], "sequence lengths"), v[1], "sequence lengths")
    dk = _same_dim(ctx, _heads_dim(ctx, q[2], hq, "query"), _heads_dim(ctx, k[2], hkv, "key"), "head sizes")
    dv = _heads_dim(ctx, v[2], hkv, "value")
    for i, what, ok in ((4, "decay", (hkv, sym.mul(hkv, dk))), (5, "beta", (hkv, 1))):
        s = ctx.shape(i) if ctx.has(i) else None
        if s is not None and (len(s) != 3 or (isinstance(s[2], int) and all(isinstance(d, int) for d in ok)
                                               and s[2] not in ok)):
            raise ctx.error(f"{what} must be [batch, seq, {' or '.join(map(str, ok))}], got {list(s)}")
    return [TensorType(t, (batch, steps, sym.mul(hq, dv))), TensorType(s_dt, (batch, hkv, dk, dv))]


def _per_head(x: Tensor, heads: int, width: int) -> Tensor:
    """[B, T, heads*width or heads or 1] -> [B, heads or 1, T, width or 1]."""
    b, t, n = x.shape
    if n == heads * width:
        return x.reshape(b, t, heads, width).transpose(1, 2)
    return x.reshape(b, t, n, 1).transpose(1, 2)


def _linear_attention_ref(c: RefCtx, xs: list[Any]) -> list[Tensor]:
    a = c.attrs
    query, key, value, past, decay, beta = xs + [None] * (6 - len(xs))
    hq, hkv, rule = a["q_num_heads"], a["kv_num_heads"], a["update_rule"]
    q = split_heads(query, hq).float()
    k, v = split_heads(key, hkv).float(), split_heads(value, hkv).float()
    b, _, steps, dk = k.shape
    dv = v.shape[-1]
    if past is not None and tuple(past.shape) != (b, hkv, dk, dv):
        raise ValueError(f"past_state must have shape {[b, hkv, dk, dv]}, got {list(past.shape)}")
    state = past.float() if past is not None else torch.zeros((b, hkv, dk, dv), device=q.device)
    gate = _per_head(decay, hkv, dk).float().exp() if decay is not None else None  # [B, Hkv, T, dk or 1]
    rate = _per_head(beta, hkv, 1).float() if beta is not None else None  # [B, Hkv or 1, T, 1]
    scale = a["scale"] or 1.0 / math.sqrt(dk)
    outs = []
    for t in range(steps):
        if gate is not None:
            state = state * gate[:, :, t].unsqueeze(-1)
        k_t, v_t = k[:, :, t], v[:, :, t]
        if rule in _DELTA:
            assert rate is not None
            v_t = rate[:, :, t] * (v_t - torch.einsum("bhdm,bhd->bhm", state, k_t))
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outs.append(scale * torch.einsum("bhd,bhdm->bhm", q[:, :, t], expand_kv_heads(state, hq)))
    out = torch.stack(outs, dim=2) if outs else q.new_zeros((b, hq, 0, dv))
    present_dtype = past.dtype if past is not None else query.dtype
    return [merge_heads(out).to(query.dtype), state.to(present_dtype)]


register(
    "LinearAttention", inputs=["query", "key", "value", "past_state?", "decay?", "beta?"],
    outputs=["output", "present_state?"],
    attrs={
        "chunk_size": Attr(AttrKind.INT, 64, doc="a tuning hint for chunked kernels; no effect on results"),
        "kv_num_heads": Attr(AttrKind.INT),
        "q_num_heads": Attr(AttrKind.INT),
        "scale": Attr(AttrKind.FLOAT, 0.0, doc="0: 1/sqrt(d_k)"),
        "update_rule": Attr(AttrKind.STRING, "gated_delta", choices=_RULES),
    },
    infer=_linear_attention_infer, ref=_linear_attention_ref,
    doc="Recurrent linear attention (linear, gated, delta, gated-delta rules) on packed [B, T, H*D] inputs.",
)


# --- FlexAttention ------------------------------------------------------------------------------------


def flex_compute_dtype(q_dtype: DType, softmax_precision: DType | None) -> DType:
    """The dtype of the scores, the modifier subgraphs and the softmax."""
    if softmax_precision is not None:
        return softmax_precision
    return DType.FLOAT64 if q_dtype is DType.FLOAT64 else DType.FLOAT32


def _check_modifier(ctx: InferCtx, g: Graph | None, what: str, cdt: DType) -> None:
    if g is None:
        return
    if len(g.inputs) != 1 or len(g.outputs) != 1:
        raise ctx.error(f"{what} must take one tensor and return one, it has {len(g.inputs)} inputs and "
                        f"{len(g.outputs)} outputs")
    t = g.outputs[0].type
    if not isinstance(t, TensorType) or t.dtype is not cdt or (t.rank is not None and t.rank != 4):
        raise ctx.error(f"{what} must return a rank-4 {cdt} tensor, it returns {t}")


def _flex_infer(ctx: InferCtx) -> list[TensorType]:
    a = ctx.attrs
    t = _float_dtype(ctx, 0, "Q")
    for i in (1, 2):
        if ctx.dtype(i) is not t:
            raise ctx.error(f"input {i} must have Q's dtype {t}, got {ctx.dtype(i)}")
    sp = a["softmax_precision"]
    if sp is not None and sp not in _FLOATS:
        raise ctx.error(f"softmax_precision must be a float type, got {sp}")
    cdt = flex_compute_dtype(t, sp)
    _check_modifier(ctx, a["score_mod"], "score_mod", cdt)
    _check_modifier(ctx, a["prob_mod"], "prob_mod", cdt)
    q, k, v = (_shape_or_fresh(ctx, i, 4, n) for i, n in ((0, "q"), (1, "k"), (2, "v")))
    batch = _same_dim(ctx, _same_dim(ctx, q[0], k[0], "batch sizes"), v[0], "batch sizes")
    hkv = _same_dim(ctx, k[1], v[1], "head counts of K and V")
    _same_dim(ctx, k[2], v[2], "sequence lengths of K and V")
    _same_dim(ctx, q[3], k[3], "head sizes of Q and K")
    if isinstance(q[1], int) and isinstance(hkv, int) and (hkv <= 0 or q[1] % hkv):
        raise ctx.error(f"Q's {q[1]} heads must be a multiple of K/V's {hkv} heads")
    return [TensorType(t, (batch, q[1], q[2], v[3]))]


def _run_modifier(c: RefCtx, g: Graph | None, x: Tensor, what: str) -> Tensor:
    if g is None:
        return x
    out = c.run_graph(g, [x])[0]
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype:
        got = f"{out.dtype}{list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what} must return {x.dtype}{list(x.shape)}, returned {got}")
    return out


def _flex_ref(c: RefCtx, xs: list[Any]) -> list[Tensor]:
    a = c.attrs
    Q, K, V = xs
    cdt = flex_compute_dtype(DType.from_torch(Q.dtype), a["softmax_precision"]).torch
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(Q.shape[-1])
    root = torch.full((), math.sqrt(scale), dtype=Q.dtype, device=Q.device)  # why: no host copy (capturable)
    keys, values = expand_kv_heads(K, Q.shape[1]), expand_kv_heads(V, Q.shape[1])
    scores = matmul(Q * root, (keys * root).transpose(-1, -2)).to(cdt)
    scores = _run_modifier(c, a["score_mod"], scores, "score_mod")
    probs = _run_modifier(c, a["prob_mod"], softmax(scores), "prob_mod")
    return [matmul(probs, values).to(Q.dtype)]


register(
    "FlexAttention", inputs=["Q", "K", "V"], outputs=["Y"],
    attrs={
        "scale": Attr(AttrKind.FLOAT, None, doc="default 1/sqrt(head_size)"),
        "softmax_precision": Attr(AttrKind.DTYPE, None, doc="default float32 (float64 for double inputs)"),
        "score_mod": Attr(AttrKind.GRAPH, None, doc="scores [B, Hq, L, S] -> modified scores"),
        "prob_mod": Attr(AttrKind.GRAPH, None, doc="probabilities [B, Hq, L, S] -> modified probabilities"),
    },
    infer=_flex_infer, ref=_flex_ref,
    doc="Attention with user subgraphs modifying the scores (before softmax) and the probabilities (after).",
)

