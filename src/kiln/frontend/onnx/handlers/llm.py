"""onnxruntime's contrib ops of its LLM exports (onnxruntime-genai's model builder): the grouped-query attention
with its key/value caches, mixtures of experts, short convolutions. Probed on onnxruntime 1.32 where its docs are
silent; each checked against it (`tests/frontend/test_contrib_ops.py`, `tests/e2e/test_genai_export.py`).

- GroupQueryAttention(query, key?, value?, past_key?, past_value?, seqlens_k, total_sequence_length, cos_cache?,
  sin_cache?; num_heads, kv_num_heads, scale, do_rotary, rotary_interleaved): causal grouped-query attention with
  onnxruntime's growing key/value cache (total_sequence_length = past + new). Sequence b's new tokens sit at
  positions p_b = seqlens_k[b] + 1 - S on (0 for a first prompt: no past tokens; a prompt may be right-padded, its
  keys past seqlens_k[b] hidden); query i sees keys j <= p_b + i; present = the past's first p_b positions, the new
  keys at p_b.., zeros after, BNSH [B, kv_num_heads, past + S, D]; with do_rotary, Q and K rotated at those
  positions first (the first 2 * cache-width dims of each head: partial rotary, as Phi's exports have);
  local_window_size W > 0 hides keys before p_b + i - W + 1. Packed QKV (key and value omitted) is split. softcap
  (Gemma-2) caps the scaled scores before the mask; attention_bias [B | 1, N | 1, S, T] is added after it;
  smooth_softmax puts a zero logit into every row's denominator and head_sink [N] (gpt-oss) that logit per head
  (with or without smooth_softmax: onnxruntime treats them alike) - built as one more key/value position of zeros
  whose mask entry is the sink, so on the GPU such a step copies the cache once more; position_ids [B, S] set the
  rotary angles' positions (the cache slots still follow seqlens_k), but in a first prompt onnxruntime starts every
  row at position_ids[0, 0] and counts on, and so does kiln. sliding_window_cache (Gemma-2's sliding layers): past
  is a cache of fixed capacity C holding each sequence's last min(history, C) tokens left-aligned, present the last
  C of those and the new tokens (see `_sliding_cache`; onnxruntime wants C >= local_window_size, and returns
  uninitialized presents where C > the window: kiln keeps the last C there). Refused by name: the QK output and
  attributes kiln does not know. onnxruntime's static ("shared buffer") cache, total_sequence_length <= past, is the
  same attention but keeps present at the past's length: kiln's present always has past + S positions (the first
  past ones equal onnxruntime's).
- CausalConvWithState(input, weight, bias?, past_state?; ndim, activation, dilation): LFM2's short convolution, a
  depthwise causal conv1d over [B, C, S] carrying its last (K - 1) * dilation input columns between steps.
- MoE(input, router_probs, fc1_experts_weights, fc1_experts_bias?, fc2_experts_weights, fc2_experts_bias?; k,
  activation_type, normalize_routing_weights, swiglu_fusion, activation_alpha/beta, swiglu_limit): a mixture of
  experts (gpt-oss): each token's top k router logits pick its experts, their weights the softmax over those k
  (normalize_routing_weights) or over all experts; expert e is fc2_e(act(fc1_e(x))) with weights [E, out, in]; act
  relu, gelu (the tanh form, as onnxruntime's MoE), silu, identity, or SwiGLU with gate and linear interleaved in
  fc1 (gate <= limit, |linear| <= limit, gate * sigmoid(alpha * gate) * (linear + beta); alpha 1, beta 0 and no
  limit by default). Run densely: every expert on every token, weighted (0 where not picked) - exact, E / k times
  the work. Refused by name: the sparse mixer, fc3 and other SwiGLU layouts.
- QMoE: MoE with 4/8-bit symmetric expert weights (per-row or per-block scales), dequantized at import.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import onnx_op
from kiln.frontend.onnx.handlers.contrib import (
    MS,
    _bnsh,
    _float_const,
    _heads,
    _merge_heads,
    _need,
    _one,
    _out,
    _positions,
    _scale,
    _seq_len,
    _unpack,
)
from kiln.ir.dtype import DType
from kiln.ir.graph import Value
from kiln.ir.ops.base import const_value

# --- grouped-query attention with onnxruntime's key/value cache -------------------------------------------------


GQA_ATTRS = frozenset({"num_heads", "kv_num_heads", "scale", "softcap", "smooth_softmax", "local_window_size",
                       "do_rotary", "rotary_interleaved", "sliding_window_cache", "qk_output"})
"""GroupQueryAttention's attributes as kiln reads them (onnxruntime 1.32); any other is refused by name, not
ignored: a new one may change what the node computes."""


def _gqa_refusals(n: NodeCtx) -> None:
    unknown = sorted(set(n.attrs) - GQA_ATTRS)
    if unknown:
        raise n.fail(f"attribute(s) {', '.join(unknown)} not known to kiln (it reads {', '.join(sorted(GQA_ATTRS))})")
    if int(n.attr("qk_output", 0) or 0):
        raise n.fail(f"qk_output={n.attr('qk_output')} (the QK output) is not supported")
    if float(n.attr("softcap", 0.0) or 0.0) < 0:
        raise n.fail(f"softcap={n.attr('softcap')} must be >= 0")
    if _out(n, 3):
        raise n.fail("output 3 (output_qk) is not supported")


def _with_sink(n: NodeCtx, k: Value, v: Value, mask: Value, hq: int) -> tuple[Value, Value, Value]:
    """Smooth softmax (a zero logit in every row's denominator) or head sinks (that logit per head): K and V
    get one more position of zeros, its score q.0 = 0, and the float mask gives it the sink (0 without
    head_sink); its value adds nothing to the output. `mask` [B, 1 | Hq, S, T] additive -> [B, Hq, S, T + 1]."""
    sink = n.input(11)
    col = _one(n, "Shape", [k])
    col = _one(n, "Concat", [_one(n, "Slice", [col, n.const([0], DType.INT64, hint="at"),
                                               n.const([2], DType.INT64, hint="to")]),
                             n.const([1], DType.INT64, hint="one"),
                             _one(n, "Slice", [col, n.const([3], DType.INT64, hint="at"),
                                               n.const([4], DType.INT64, hint="to")])], {"axis": 0})
    zero = _one(n, "ConstantOfShape", [col], {"value": torch.zeros(1, dtype=k.dtype.torch)})  # [B, Hkv, 1, d]
    k = _one(n, "Concat", [k, zero], {"axis": 2})
    v = _one(n, "Concat", [v, zero], {"axis": 2})
    mask = _one(n, "Add", [mask, n.const(torch.zeros(1, hq, 1, 1), mask.dtype, hint="heads")])  # [B, Hq, S, T]
    last = _one(n, "Slice", [mask, n.const([-1], DType.INT64, hint="at"), n.const([2**62], DType.INT64, hint="to"),
                             n.const([3], DType.INT64, hint="axis")])
    col = _one(n, "ConstantOfShape", [_one(n, "Shape", [last])], {"value": torch.zeros(1, dtype=mask.dtype.torch)})
    if sink is not None:  # [B, Hq, S, 1] of each head's sink
        col = _one(n, "Add", [col, _one(n, "Cast", [_one(n, "Reshape", [
            sink, n.const([1, hq, 1, 1], DType.INT64, hint="heads")])], {"to": mask.dtype})])
    return k, v, _one(n, "Concat", [mask, col], {"axis": 3})


def _sliding_cache(n: NodeCtx, past_k: Value, past_v: Value, new_k: Value, new_v: Value, h: Value,
                   seq: Value) -> tuple[Value, Value, Value, Value, Value]:
    """onnxruntime's sliding_window_cache: past [B, H, C, d] of fixed capacity C holds sequence b's last
    v_b = min(h_b, C) tokens left-aligned (h_b tokens came before the new ones: positions h_b - v_b ..), and
    present keeps the last C of those and the new tokens (zeros after, while fewer than C). Probed on onnxruntime
    1.32. Returns the keys and values the step attends over - past ++ new, [B, H, C + S, d] - the presents and
    each of those keys' position [B, C + S] (hidden by the caller when past the sequence's end)."""
    axes0, axes1 = n.const([0], DType.INT64, hint="axes"), n.const([1], DType.INT64, hint="axes")
    keys = _one(n, "Concat", [past_k, new_k], {"axis": 2})
    values = _one(n, "Concat", [past_v, new_v], {"axis": 2})
    cap, s = _seq_len(n, past_k, 2), _seq_len(n, new_k, 2)
    kept = _one(n, "Min", [h, cap])  # [B]: valid past slots
    e = _positions(n, keys, 2)  # [C + S]
    in_past = _one(n, "Less", [e, cap])
    h1, kept1 = _one(n, "Unsqueeze", [h, axes1]), _one(n, "Unsqueeze", [kept, axes1])  # [B, 1]
    e0 = _one(n, "Unsqueeze", [e, axes0])  # [1, C + S]
    at = _one(n, "Where", [in_past, _one(n, "Add", [_one(n, "Sub", [h1, kept1]), e0]),
                           _one(n, "Add", [h1, _one(n, "Sub", [e0, cap])])])  # [B, C + S] positions
    big = n.const(2**62, DType.INT64, hint="unseen")  # an empty past slot: past every query's position
    at = _one(n, "Where", [_one(n, "And", [in_past, _one(n, "GreaterOrEqual", [e0, kept1])]), big, at])
    # present: slot t takes valid token u = t + drop (drop = how many of the valid ones C cannot hold)
    new = _one(n, "Min", [s, _one(n, "Sub", [_one(n, "Add", [seq, n.const(1, DType.INT64, hint="one")]), h])])
    total = _one(n, "Add", [kept, new])  # [B]
    drop = _one(n, "Max", [_one(n, "Sub", [total, cap]), n.const(0, DType.INT64, hint="zero")])
    u = _one(n, "Add", [_one(n, "Unsqueeze", [_positions(n, past_k, 2), axes0]),
                        _one(n, "Unsqueeze", [drop, axes1])])  # [B, C]
    src = _one(n, "Where", [_one(n, "Less", [u, kept1]), u, _one(n, "Add", [cap, _one(n, "Sub", [u, kept1])])])
    keep = _one(n, "Less", [u, _one(n, "Unsqueeze", [total, axes1])])  # [B, C]
    src = _one(n, "Where", [keep, src, n.const(0, DType.INT64, hint="zero")])
    both = n.const([1, 3], DType.INT64, hint="axes")
    idx = _one(n, "Expand", [_one(n, "Unsqueeze", [src, both]), _one(n, "Shape", [past_k])])  # [B, H, C, d]
    keep = _one(n, "Unsqueeze", [keep, both])
    presents = [_one(n, "Where", [keep, _one(n, "GatherElements", [x, idx], {"axis": 2}),
                                  _float_const(n, x, 0.0, "zero")]) for x in (keys, values)]
    return keys, values, presents[0], presents[1], at


def _rotary_positions(n: NodeCtx, q: Value, first: Value | None) -> Value:
    """The rotary angles' positions [B | 1, S] from position_ids (the cache slots still follow seqlens_k): row b's
    own ids, except in a first prompt (no past: `first` None, or an empty one), where onnxruntime starts every row
    at position_ids[0, 0] and counts on (probed on onnxruntime 1.32: the other ids are not read)."""
    ids = _one(n, "Cast", [_need(n, 9, "position_ids")], {"to": DType.INT64})
    corner = _one(n, "Slice", [ids, n.const([0, 0], DType.INT64, hint="at"), n.const([1, 1], DType.INT64, hint="to")])
    counted = _one(n, "Add", [corner, _one(n, "Unsqueeze", [_positions(n, q, 1), n.const([0], DType.INT64,
                                                                                           hint="axes")])])
    return counted if first is None else _one(n, "Where", [first, counted, ids])


def _cache(n: NodeCtx, past: Value | None, new: Value, start: Value, pos: Value) -> Value:
    """present [B, H, P + S, d]: past[:, :, :start_b] (zeros after), the new [B, H, S, d] written at pos."""
    if past is None:
        return new
    zeros = _one(n, "ConstantOfShape", [_one(n, "Shape", [new])], {"value": torch.zeros(1, dtype=new.dtype.torch)})
    ext = _one(n, "Concat", [past, zeros], {"axis": 2})
    j = _positions(n, ext, 2)  # [T]
    keep = _one(n, "Less", [j, _one(n, "Unsqueeze", [start, n.const([1], DType.INT64, hint="axes")])])  # [B, T]
    keep = _one(n, "Unsqueeze", [keep, n.const([1, 3], DType.INT64, hint="axes")])  # [B, 1, T, 1]
    kept = _one(n, "Where", [keep, ext, _float_const(n, ext, 0.0, "zero")])
    idx = _one(n, "Unsqueeze", [pos, n.const([1, 3], DType.INT64, hint="axes")])  # [B, 1, S, 1]
    idx = _one(n, "Expand", [idx, _one(n, "Shape", [new])])
    return _one(n, "ScatterElements", [kept, idx, new], {"axis": 2})


@onnx_op("GroupQueryAttention", domain=MS)
def group_query_attention(n: NodeCtx) -> list[Value | None]:
    _gqa_refusals(n)
    hq, hkv = _heads(n), int(n.attr("kv_num_heads", 0) or 0)
    if hkv <= 0 or hq % hkv:
        raise n.fail(f"kv_num_heads={hkv} must be positive and divide num_heads={hq}")
    q, k, v = _need(n, 0, "query"), n.input(1), n.input(2)
    width = q.shape[2] if q.shape is not None and q.rank == 3 else None
    if not isinstance(width, int):
        raise n.fail(f"query must be [batch, sequence, hidden] with a static hidden size, got {q.type}")
    if k is None and v is None:  # packed QKV
        if width % (hq + 2 * hkv):
            raise n.fail(f"a packed QKV of width {width} does not split into {hq} + 2 * {hkv} heads")
        d = width // (hq + 2 * hkv)
        q, k, v = n.emit("Split", [q, n.const([hq * d, hkv * d, hkv * d], DType.INT64, hint="sizes")],
                         {"axis": 2}, outputs=3)
    elif k is None or v is None:
        raise n.fail("key and value are given together, or both omitted (packed QKV)")
    else:
        if width % hq:
            raise n.fail(f"query width {width} is not a multiple of num_heads {hq}")
        d = width // hq
    past_k, past_v = n.input(3), n.input(4)
    if (past_k is None) != (past_v is None):
        raise n.fail("past_key and past_value are given together")
    seq = _one(n, "Cast", [_need(n, 5, "seqlens_k")], {"to": DType.INT64})  # [B]
    # the first new token's position: seqlens_k + 1 - S after a past, 0 for a first prompt (no past tokens)
    if past_k is not None:
        start = _one(n, "Sub", [_one(n, "Add", [seq, n.const(1, DType.INT64, hint="one")]), _seq_len(n, q, 1)])
        first = _one(n, "Equal", [_seq_len(n, past_k, 2), n.const(0, DType.INT64, hint="zero")])
        start = _one(n, "Where", [first, n.const(0, DType.INT64, hint="zero"), start])
    else:  # every sequence starts at 0: one row of positions serves the batch
        first, start = None, n.const([0], DType.INT64, hint="start")
    pos = _one(n, "Add", [_one(n, "Unsqueeze", [start, n.const([1], DType.INT64, hint="axes")]),
                          _one(n, "Unsqueeze", [_positions(n, q, 1), n.const([0], DType.INT64, hint="axes")])])
    if n.attr("do_rotary", 0):
        cos, sin = _need(n, 7, "cos_cache"), _need(n, 8, "sin_cache")
        inter = int(n.attr("rotary_interleaved", 0))
        turn = pos if n.input(9) is None else _rotary_positions(n, q, first)
        rot: dict[str, Any] = {"interleaved": inter}
        cols = cos.shape[-1] if cos.shape else None
        if isinstance(cols, int) and 2 * cols < d:  # partial rotary (Phi, Nemotron): the first 2 * cols dims
            rot["rotary_embedding_dim"] = 2 * cols
        q = _one(n, "RotaryEmbedding", [q, cos, sin, turn], {"num_heads": hq, **rot})
        k = _one(n, "RotaryEmbedding", [k, cos, sin, turn], {"num_heads": hkv, **rot})
    window = int(n.attr("local_window_size", -1))
    if n.attr("sliding_window_cache", 0):
        if past_k is None or past_v is None or window <= 0:
            raise n.fail("sliding_window_cache needs past_key/past_value (the cache, of fixed capacity) and a "
                         "local_window_size")
        keys, values, present_k, present_v, j = _sliding_cache(n, past_k, past_v, _bnsh(n, k, hkv, d),
                                                                _bnsh(n, v, hkv, d), start, seq)
        valid = _one(n, "Unsqueeze", [_one(n, "LessOrEqual", [j, _one(n, "Unsqueeze", [seq, n.const(
            [1], DType.INT64, hint="axes")])]), n.const([1], DType.INT64, hint="axes")])  # [B, 1, T]
        j = _one(n, "Unsqueeze", [j, n.const([1], DType.INT64, hint="axes")])  # [B, 1, T]: each key's position
    else:
        present_k = _cache(n, past_k, _bnsh(n, k, hkv, d), start, pos)
        present_v = _cache(n, past_v, _bnsh(n, v, hkv, d), start, pos)
        keys, values = present_k, present_v
        j = _positions(n, present_k, 2)  # [T]
        valid = _one(n, "LessOrEqual", [j, _one(n, "Unsqueeze", [seq, n.const([1, 2], DType.INT64, hint="axes")])])
    sees = _one(n, "LessOrEqual", [j, _one(n, "Unsqueeze", [pos, n.const([2], DType.INT64, hint="axes")])])
    allowed = _one(n, "And", [sees, valid])
    if window > 0:  # the last `window` positions up to the query's own (onnxruntime's sliding window)
        lo = _one(n, "Sub", [pos, n.const(window - 1, DType.INT64, hint="window")])
        near = _one(n, "GreaterOrEqual", [j, _one(n, "Unsqueeze", [lo, n.const([2], DType.INT64, hint="axes")])])
        allowed = _one(n, "And", [allowed, near])
    mask = _one(n, "Unsqueeze", [allowed, n.const([1], DType.INT64, hint="axes")])  # [B, 1, S, T]
    bias, sinks = n.input(10), n.input(11) is not None or bool(n.attr("smooth_softmax", 0))
    if bias is not None or sinks:  # an additive float mask: -inf where hidden, plus attention_bias
        dt = q.dtype if q.dtype.is_float else DType.FLOAT32
        mask = _one(n, "Where", [mask, n.const(0.0, dt, hint="zero"), n.const(float("-inf"), dt, hint="hidden")])
        if bias is not None:  # [B | 1, Hq | 1, S, T]
            mask = _one(n, "Add", [mask, bias if bias.dtype is dt else _one(n, "Cast", [bias], {"to": dt})])
        if sinks:
            keys, values, mask = _with_sink(n, keys, values, mask, hq)
    attrs = _scale(n, {"q_num_heads": hq, "kv_num_heads": hkv})
    softcap = float(n.attr("softcap", 0.0) or 0.0)
    if softcap:
        attrs["softcap"] = softcap
    y = _one(n, "Attention", [_bnsh(n, q, hq, d), keys, values, mask], attrs)  # [B, Hq, S, d]
    return [_merge_heads(n, y, hq * d), present_k, present_v]


# --- other LLM blocks: short convolutions, mixtures of experts ----------------------------------------------------


CONV_STATE_ATTRS = frozenset({"ndim", "activation", "state_window", "dilation"})


@onnx_op("CausalConvWithState", domain=MS)
def causal_conv_with_state(n: NodeCtx) -> list[Value]:
    """LFM2's short convolution: a depthwise causal conv1d over [B, C, S] that carries its last (K - 1) * dilation
    input columns from step to step: y = conv(past_state ++ x) (+ bias, then SiLU with activation 'silu'), the new
    state the last (K - 1) * dilation columns of past_state ++ x (probed on onnxruntime 1.32)."""
    unknown = sorted(set(n.attrs) - CONV_STATE_ATTRS)
    if unknown:
        raise n.fail(f"attribute(s) {', '.join(unknown)} not known to kiln (it reads "
                     f"{', '.join(sorted(CONV_STATE_ATTRS))})")
    if int(n.attr("ndim", 1)) != 1 or int(n.attr("state_window", 0) or 0):
        raise n.fail(f"ndim={n.attr('ndim', 1)}, state_window={n.attr('state_window', 0)}: only the 1-D form with "
                     "a [batch, channels, (kernel - 1) * dilation] state is supported")
    act = n.attr("activation", "none")
    act = act.decode() if isinstance(act, bytes) else str(act)
    if act not in ("none", "silu"):
        raise n.fail(f"activation '{act}' is not supported (none, silu)")
    x, w = _need(n, 0, "input"), _need(n, 1, "weight")
    kernel = w.shape[2] if w.shape is not None and len(w.shape) == 3 else None
    channels = x.shape[1] if x.shape is not None and len(x.shape) == 3 else None
    if not isinstance(kernel, int) or not isinstance(channels, int):
        raise n.fail(f"input [batch, channels, sequence] with static channels and a [channels, 1, kernel] weight "
                     f"expected, got {x.type}, {w.type}")
    dilation = int(n.attr("dilation", 1) or 1)
    keep = (kernel - 1) * dilation
    state = n.input(3)
    if state is None:  # a first step: zeros before the sequence
        shape = _one(n, "Concat", [_one(n, "Slice", [_one(n, "Shape", [x]), n.const([0], DType.INT64, hint="at"),
                                                     n.const([2], DType.INT64, hint="to")]),
                                   n.const([keep], DType.INT64, hint="keep")], {"axis": 0})
        state = _one(n, "ConstantOfShape", [shape], {"value": torch.zeros(1, dtype=x.dtype.torch)})
    full = _one(n, "Concat", [state, x], {"axis": 2})
    y = _one(n, "Conv", [full, w, n.input(2)], {"group": channels, "dilations": [dilation], "kernel_shape": [kernel]})
    if act == "silu":
        y = _one(n, "Mul", [y, _one(n, "Sigmoid", [y])])
    at = -keep if keep else 2**62  # the last `keep` columns (none for a 1-wide kernel)
    present = _one(n, "Slice", [full, n.const([at], DType.INT64, hint="at"), n.const([2**62], DType.INT64, hint="to"),
                                n.const([2], DType.INT64, hint="axis")])
    return [y, present]


MOE_ATTRS = frozenset({"k", "activation_type", "normalize_routing_weights", "use_sparse_mixer", "swiglu_fusion",
                       "activation_alpha", "activation_beta", "swiglu_limit"})


def _moe_checks(n: NodeCtx, known: frozenset[str]) -> str:
    """Refusals shared by MoE and QMoE; returns the activation."""
    unknown = sorted(set(n.attrs) - known)
    if unknown:
        raise n.fail(f"attribute(s) {', '.join(unknown)} not known to kiln (it reads {', '.join(sorted(known))})")
    if int(n.attr("use_sparse_mixer", 0) or 0):
        raise n.fail("use_sparse_mixer=1 (Phi-3.5-MoE's sparse mixer routing) is not supported")
    act = n.attr("activation_type", "relu")
    act = act.decode() if isinstance(act, bytes) else str(act)
    if act not in ("relu", "gelu", "silu", "identity", "swiglu"):
        raise n.fail(f"activation_type '{act}' is not supported (relu, gelu, silu, identity, swiglu)")
    if act == "swiglu" and int(n.attr("swiglu_fusion", 0) or 0) != 1:
        raise n.fail(f"swiglu_fusion={n.attr('swiglu_fusion', 0)}: only 1 (gate and linear interleaved in fc1) is "
                     "supported, as onnxruntime's CPU kernel supports")
    return act


@onnx_op("MoE", domain=MS)
def mixture_of_experts(n: NodeCtx) -> list[Value]:
    """Every expert run on every token and weighted by its routing weight (0 for the experts a token's top k did
    not pick): exact, and E / k times the work of running the picked experts alone."""
    act = _moe_checks(n, MOE_ATTRS)
    if any(n.input(i) is not None for i in (6, 7)):
        raise n.fail("fc3 (a separate gate projection) is not supported")
    return _experts(n, act, _need(n, 2, "fc1_experts_weights"), n.input(3), _need(n, 4, "fc2_experts_weights"),
                    n.input(5))


QMOE_ATTRS = MOE_ATTRS | {"expert_weight_bits", "block_size"}


@onnx_op("QMoE", domain=MS)
def quantized_mixture_of_experts(n: NodeCtx) -> list[Value]:
    """MoE with 4- or 8-bit expert weights (onnxruntime-genai's INT4 gpt-oss): symmetric, zero point 2**(bits - 1),
    4-bit values packed two to a byte low nibble first; scales per output row [E, rows] or per block along the
    input [E, rows, in / block_size]. Dequantized at import (as MatMulNBits): the model runs, without the memory
    saving. Probed on onnxruntime 1.32: 4-bit (per row and per block) and 8-bit per row agree with the float product
    to 5e-7 relative; its 8-bit per-block kernel differs from it by ~1 % (cause not established)."""
    act = _moe_checks(n, QMOE_ATTRS)
    for i, what in ((8, "fc3"), (9, "fc3"), (10, "fc3"), (11, "zero points"), (12, "zero points"),
                    (13, "zero points"), (14, "router_weights")):
        if n.input(i) is not None:
            raise n.fail(f"input {i} ({what}) is not supported")
    bits = int(n.attr("expert_weight_bits", 4))
    if bits not in (4, 8):
        raise n.fail(f"expert_weight_bits={bits}: 4 or 8 expected")
    x = _need(n, 0, "input")
    weights = []
    for at, what in ((2, "fc1"), (5, "fc2")):
        q, scale = const_value(_need(n, at, f"{what}_experts_weights")), const_value(_need(n, at + 1, f"{what}_scales"))
        if not isinstance(q, torch.Tensor) or not isinstance(scale, torch.Tensor) or q.dim() != 3:
            raise n.fail(f"{what}'s weights and scales must be constants, the weights [E, rows, in * bits / 8]")
        cols = q.shape[2] * 8 // bits
        w = (_unpack(q, bits, cols) if bits == 4 else q.to(torch.int32)).to(torch.float64) - 2 ** (bits - 1)
        scale = scale.to(torch.float64)
        if scale.dim() == 2:  # per row
            w = w * scale[..., None]
        else:  # per block of the input
            block = cols // scale.shape[2]
            w = (w.reshape(*w.shape[:2], -1, block) * scale[..., None]).reshape(w.shape)
        weights.append(n.const(w.to(x.dtype.torch), x.dtype, hint=f"{what}_weights"))
    return _experts(n, act, weights[0], n.input(4), weights[1], n.input(7))


def _experts(n: NodeCtx, act: str, w1: Value, b1: Value | None, w2: Value, b2: Value | None) -> list[Value]:
    """The dense mixture: fc1 [E, F, H] (+ b1 [E, F]), the activation, fc2 [E, H, I] (+ b2 [E, H]), weighted by
    the routing weights of each token's top k."""
    x, router = _need(n, 0, "input"), _need(n, 1, "router_probs")
    width = x.shape[-1] if x.shape else None
    if not isinstance(width, int) or w1.rank != 3 or w2.rank != 3:
        raise n.fail(f"input [..., hidden] with a static hidden size and 3-D expert weights expected, got "
                     f"{x.type}, {w1.type}, {w2.type}")
    k = int(n.attr("k", 1))
    axes = {i: n.const([i], DType.INT64, hint="axes") for i in (0, 1, 2)}
    rows = _one(n, "Reshape", [x, n.const([-1, width], DType.INT64, hint="rows")])  # [N, H]
    top, picked = n.emit("TopK", [router, n.const([k], DType.INT64, hint="k")], {"axis": -1}, outputs=2)
    if int(n.attr("normalize_routing_weights", 0) or 0):
        weights = _one(n, "Softmax", [top], {"axis": -1})
    else:
        weights = _one(n, "GatherElements", [_one(n, "Softmax", [router], {"axis": -1}), picked], {"axis": 1})
    zeros = _one(n, "ConstantOfShape", [_one(n, "Shape", [router])],
                 {"value": torch.zeros(1, dtype=router.dtype.torch)})
    dense = _one(n, "ScatterElements", [zeros, picked, weights], {"axis": 1})  # [N, E]
    h = _one(n, "MatMul", [rows, _one(n, "Transpose", [w1], {"perm": [0, 2, 1]})])  # [E, N, F]
    if b1 is not None:
        h = _one(n, "Add", [h, _one(n, "Unsqueeze", [b1, axes[1]])])
    if act == "relu":
        h = _one(n, "Relu", [h])
    elif act == "gelu":  # onnxruntime's MoE uses the tanh approximation (probed on 1.32)
        h = _one(n, "Gelu", [h], {"approximate": "tanh"})
    elif act == "silu":
        h = _one(n, "Mul", [h, _one(n, "Sigmoid", [h])])
    elif act == "swiglu":  # gpt-oss: gate, linear interleaved; gate <= limit, |linear| <= limit
        big = n.const([2**62], DType.INT64, hint="end")
        two = n.const([2], DType.INT64, hint="step")
        gate = _one(n, "Slice", [h, n.const([0], DType.INT64, hint="at"), big, axes[2], two])
        lin = _one(n, "Slice", [h, n.const([1], DType.INT64, hint="at"), big, axes[2], two])
        limit = n.attr("swiglu_limit")
        if limit is not None and math.isfinite(float(limit)):
            gate = _one(n, "Min", [gate, _float_const(n, gate, float(limit), "limit")])
            lin = _one(n, "Clip", [lin, _float_const(n, lin, -float(limit), "low"),
                                   _float_const(n, lin, float(limit), "high")])
        alpha, beta = float(n.attr("activation_alpha", 1.0)), float(n.attr("activation_beta", 0.0))
        glu = _one(n, "Mul", [gate, _one(n, "Sigmoid", [_one(n, "Mul", [gate, _float_const(n, gate, alpha,
                                                                                             "alpha")])])])
        h = _one(n, "Mul", [glu, _one(n, "Add", [lin, _float_const(n, lin, beta, "beta")])])
    y = _one(n, "MatMul", [h, _one(n, "Transpose", [w2], {"perm": [0, 2, 1]})])  # [E, N, H]
    if b2 is not None:
        y = _one(n, "Add", [y, _one(n, "Unsqueeze", [b2, axes[1]])])
    if dense.dtype is not y.dtype:
        dense = _one(n, "Cast", [dense], {"to": y.dtype})
    share = _one(n, "Unsqueeze", [_one(n, "Transpose", [dense], {"perm": [1, 0]}), axes[2]])  # [E, N, 1]
    out = _one(n, "ReduceSum", [_one(n, "Mul", [y, share]), axes[0]], {"keepdims": 0})
    return [_one(n, "Reshape", [out, _one(n, "Shape", [x])])]
