"""ONNX Runtime's contrib ops (domain com.microsoft, and SimplifiedLayerNormalization, which onnxruntime registers in
the ONNX domain) as kiln ops.

onnxruntime's transformer optimizer (`onnxruntime.transformers.optimizer`, and Optimum's ORTOptimizer on top of it)
rewrites exported models into these; many published "optimized" ONNX files hold them. Each lowers here to the ops
kiln's passes already fuse (a LayerNorm after an Add becomes a residual norm, a packed QKV MatMul a GEMM, Split and
Attention the packed attention), with onnxruntime's semantics, which the tests hold them to (onnxruntime itself is
the reference):

- SkipLayerNormalization(input, skip, gamma, beta?, bias?): s = input + skip (+ bias); LayerNormalization(s) over
  the last axis; outputs (Y, mean, inv_std_var, s). SkipSimplifiedLayerNormalization: the same with RMS
  normalization (no beta); SimplifiedLayerNormalization(X, scale): RMS normalization, (Y, inv_std_var).
- Gelu / BiasGelu(A, B) / FastGelu(X, bias?): erf GELU, of A + B; the tanh approximation of X (+ bias).
  QuickGelu(alpha): x * sigmoid(alpha * x). BiasAdd(X, bias, skip): X + bias + skip (onnxruntime runs it on
  CUDA only).
- FusedMatMul(A, B; transA, transB, alpha): alpha * op(A) @ op(B), op swapping the last two axes (the batch
  transposes transBatchA/B are refused).
- EmbedLayerNormalization(ids, segment_ids?, word, position, segment?, gamma, beta, mask?, position_ids?): the
  lookups summed (positions 0..S-1 unless given), LayerNormalization; outputs (Y, mask_index, sum), mask_index the
  count of mask values equal to 1 per sequence (zeros without a mask).
- Attention(input, weights, bias?, mask_index?, past?, attention_bias?): Q, K, V = split(input @ weights + bias)
  (`qkv_hidden_sizes`, else thirds), scaled dot-product attention over `num_heads` heads, `scale` (else
  1/sqrt(head size)), causal when `unidirectional`; the mask adds `mask_filter_value` (-10000) where a key is
  hidden: mask_index [B] (keys at and past that end hidden), [B, T] or [B, S, T] (0 hides), plus attention_bias.
  With a key/value cache (GPT-2 as onnxruntime's optimizer writes it): past [2, B, N, P, H] (keys, values) ->
  present [2, B, N, P + S, H], the queries at positions P.. (so `unidirectional` hides keys after P + i), masks
  over all P + S keys; past with attention_bias is refused, as onnxruntime refuses it.
- QAttention / QEmbedLayerNormalization: what onnxruntime's dynamic quantization makes of an optimized BERT's
  Attention (the QKV projection an int8 MatMulInteger, scaled) and EmbedLayerNormalization (quantized tables,
  dequantized at import).
- MultiHeadAttention(query, key, value, bias?, key_padding_mask?, attention_bias?, past_key?, past_value?): the
  same on separate 3-D Q, K, V; its cache past_key / past_value [B, N, P, H] -> present_key / present_value.
- MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?; K, N, bits, block_size): A @ W^T (+ bias), W [N, K] the
  weight quantized to `bits` (2-8) in blocks of `block_size` along K: (q - zero point) * scale, the zero point
  2**(bits - 1) unless given (packed like q, or in A's dtype). The weight is dequantized when the model is imported
  (B, scales and zero points constants): the engine runs it as a float MatMul - the model runs, without the
  memory saving of 4-bit weights. g_idx (act-order) is refused. accuracy_level is not followed: kiln multiplies
  in float, as onnxruntime does at level 0; at level 4 (onnxruntime-genai's CPU default) onnxruntime quantizes
  the activations to int8 first, and its logits then differ from the float product's by ~1 % (a random tiny
  LLaMA built by onnxruntime-genai's builder: 0.029 of 2.4; at level 0 kiln and onnxruntime agree to 1.2e-6).
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
- RotaryEmbedding(input, position_ids, cos_cache, sin_cache; interleaved, num_heads, rotary_embedding_dim): the
  ONNX RotaryEmbedding with its inputs reordered; position_ids [B, S], or [1] - the first position, the rest
  following it; a 3-D input without num_heads has heads of twice the cache's width (or rotary_embedding_dim).

Refused with the reason (`UnsupportedError` naming the node): the shared-buffer caches (past_sequence_length),
beam search's cache_indirection, MultiHeadAttention's QK output, rotary attention (`do_rotary`), 2*B and 4-D
mask_index forms, MultiHeadAttention's packed forms, RotaryEmbedding's packed batching and a scale other than 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import onnx_op
from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Value
from kiln.ir.ops.base import const_value

MS = "com.microsoft"
MASK_FILTER_VALUE = -10000.0
"""onnxruntime's default for `mask_filter_value`: what a hidden key's score gets added."""


def _out(n: NodeCtx, i: int) -> bool:
    """Whether output i has a name (is asked for)."""
    return i < len(n.output_names) and bool(n.output_names[i])


def _one(n: NodeCtx, op: str, inputs: list[Value | None], attrs: dict[str, Any] | None = None) -> Value:
    (v,) = n.emit(op, inputs, attrs, outputs=1)
    return v


def _need(n: NodeCtx, i: int, what: str) -> Value:
    v = n.input(i)
    if v is None:
        raise n.fail(f"input {i} ({what}) is required")
    return v


def _float_const(n: NodeCtx, x: Value, value: float, hint: str) -> Value:
    return n.const(float(value), x.dtype if x.dtype.is_float else DType.FLOAT32, hint=hint)


# --- normalizations ---------------------------------------------------------------------------------------------


def _skip_sum(n: NodeCtx, bias_at: int) -> Value:
    s = _one(n, "Add", [_need(n, 0, "input"), _need(n, 1, "skip")])
    bias = n.input(bias_at)
    return _one(n, "Add", [s, bias]) if bias is not None else s


def _inv_rms(n: NodeCtx, x: Value, eps: float) -> Value:
    """1 / sqrt(mean(x^2 over the last axis) + eps), keeping the axis (RMS normalization's inv_std_var)."""
    sq = _one(n, "Mul", [x, x])
    mean = _one(n, "ReduceMean", [sq, n.const([-1], DType.INT64, hint="axes")], {"keepdims": 1})
    root = _one(n, "Sqrt", [_one(n, "Add", [mean, _float_const(n, x, eps, "epsilon")])])
    return _one(n, "Reciprocal", [root])


@onnx_op("SkipLayerNormalization", domain=MS)
def skip_layer_normalization(n: NodeCtx) -> list[Value | None]:
    s = _skip_sum(n, 4)
    eps = float(n.attr("epsilon", 1e-12))
    stats = _out(n, 1) or _out(n, 2)
    outs = n.emit("LayerNormalization", [s, _need(n, 2, "gamma"), n.input(3)], {"axis": -1, "epsilon": eps},
                  outputs=3 if stats else 1)
    return [outs[0], *(outs[1:] if stats else [None, None]), s]


@onnx_op("SkipSimplifiedLayerNormalization", domain=MS)
def skip_simplified_layer_normalization(n: NodeCtx) -> list[Value | None]:
    if _out(n, 1):
        raise n.fail("output 1 (mean) is not defined for RMS normalization")
    s = _skip_sum(n, 3)
    eps = float(n.attr("epsilon", 1e-12))
    y = _one(n, "RMSNormalization", [s, _need(n, 2, "gamma")], {"axis": -1, "epsilon": eps})
    return [y, None, _inv_rms(n, s, eps) if _out(n, 2) else None, s]


@onnx_op("SimplifiedLayerNormalization", domain="")
def simplified_layer_normalization(n: NodeCtx) -> list[Value | None]:
    x = _need(n, 0, "X")
    eps = float(n.attr("epsilon", 1e-5))
    axis = int(n.attr("axis", -1))
    if axis not in (-1, (x.rank or 0) - 1):
        raise n.fail(f"axis {axis}: kiln takes SimplifiedLayerNormalization over the last axis only")
    y = _one(n, "RMSNormalization", [x, _need(n, 1, "scale")], {"axis": -1, "epsilon": eps})
    return [y, _inv_rms(n, x, eps) if _out(n, 1) else None]


# --- activations and sums ---------------------------------------------------------------------------------------


@onnx_op("Gelu", domain=MS)
def gelu(n: NodeCtx) -> list[Value]:
    return [_one(n, "Gelu", [_need(n, 0, "X")], {"approximate": "none"})]


@onnx_op("BiasGelu", domain=MS)
def bias_gelu(n: NodeCtx) -> list[Value]:
    s = _one(n, "Add", [_need(n, 0, "A"), _need(n, 1, "B")])
    return [_one(n, "Gelu", [s], {"approximate": "none"})]


@onnx_op("FastGelu", domain=MS)
def fast_gelu(n: NodeCtx) -> list[Value]:
    x = _need(n, 0, "X")
    if n.input(1) is not None:
        x = _one(n, "Add", [x, n.input(1)])
    return [_one(n, "Gelu", [x], {"approximate": "tanh"})]


@onnx_op("QuickGelu", domain=MS)
def quick_gelu(n: NodeCtx) -> list[Value]:
    return [_one(n, "Swish", [_need(n, 0, "X")], {"alpha": float(n.attr("alpha", 1.702))})]


@onnx_op("BiasAdd", domain=MS)
def bias_add(n: NodeCtx) -> list[Value]:
    s = _one(n, "Add", [_need(n, 0, "X"), _need(n, 1, "bias")])
    return [_one(n, "Add", [s, _need(n, 2, "skip")])]


@onnx_op("FusedMatMul", domain=MS)
def fused_matmul(n: NodeCtx) -> list[Value]:
    if n.attr("transBatchA", 0) or n.attr("transBatchB", 0):
        raise n.fail("transBatchA / transBatchB are not supported", hint="export without onnxruntime's fusions")
    ops = []
    for i, flag in ((0, "transA"), (1, "transB")):
        v = _need(n, i, "A" if i == 0 else "B")
        if n.attr(flag, 0):
            if v.rank is None or v.rank < 2:
                raise n.fail(f"{flag} needs an input of known rank >= 2")
            perm = [*range(v.rank - 2), v.rank - 1, v.rank - 2]
            v = _one(n, "Transpose", [v], {"perm": perm})
        ops.append(v)
    y = _one(n, "MatMul", ops)
    alpha = float(n.attr("alpha", 1.0))
    return [y if alpha == 1.0 else _one(n, "Mul", [y, _float_const(n, y, alpha, "alpha")])]


# --- embeddings -------------------------------------------------------------------------------------------------


def _seq_len(n: NodeCtx, x: Value, axis: int) -> Value:
    """x.shape[axis] as an int64 scalar."""
    shape = _one(n, "Shape", [x])
    return _one(n, "Gather", [shape, n.const(axis, DType.INT64, hint="axis")], {"axis": 0})


def _positions(n: NodeCtx, x: Value, axis: int) -> Value:
    """0, 1, ..., x.shape[axis] - 1 (int64)."""
    return _one(n, "Range", [n.const(0, DType.INT64, hint="start"), _seq_len(n, x, axis),
                             n.const(1, DType.INT64, hint="step")])


@onnx_op("EmbedLayerNormalization", domain=MS)
def embed_layer_normalization(n: NodeCtx) -> list[Value | None]:
    tables = [_need(n, 2, "word_embedding"), _need(n, 3, "position_embedding"), n.input(4), _need(n, 5, "gamma"),
              _need(n, 6, "beta")]
    return _embed(n, tables, n.input(7), n.input(8))


@onnx_op("QEmbedLayerNormalization", domain=MS)
def quantized_embed_layer_normalization(n: NodeCtx) -> list[Value | None]:
    """EmbedLayerNormalization with its tables, gamma and beta quantized (onnxruntime's dynamic quantization of an
    optimized BERT): inputs 2-6 the quantized tensors, 8-12 their scales, 13-17 their zero points; dequantized at
    import."""
    names = ("word_embedding", "position_embedding", "segment_embedding", "gamma", "beta")
    tables: list[Value | None] = []
    for i, what in enumerate(names):
        q = n.input(2 + i)
        if q is None:
            tables.append(None)
            continue
        zp = n.input(13 + i)
        tables.append(_one(n, "DequantizeLinear", [q, _need(n, 8 + i, f"{what}_scale")] + ([zp] if zp else [])))
    if tables[0] is None or tables[1] is None or tables[3] is None or tables[4] is None:
        raise n.fail("word and position embeddings, gamma and beta are required")
    return _embed(n, tables, n.input(7), None)


def _embed(n: NodeCtx, tables: list[Value | None], mask: Value | None,
           positions: Value | None) -> list[Value | None]:
    """The lookups (word, position, segment) summed and normalized (gamma, beta), and the mask's index."""
    word, position, segment, gamma, beta = tables
    assert word is not None and position is not None and gamma is not None and beta is not None
    ids = _need(n, 0, "input_ids")
    total = _one(n, "Gather", [word, ids], {"axis": 0})
    pos = positions if positions is not None else _positions(n, ids, 1)
    total = _one(n, "Add", [total, _one(n, "Gather", [position, pos], {"axis": 0})])
    if n.input(1) is not None and segment is not None:
        total = _one(n, "Add", [total, _one(n, "Gather", [segment, n.input(1)], {"axis": 0})])
    eps = float(n.attr("epsilon", 1e-12))
    y = _one(n, "LayerNormalization", [total, gamma, beta], {"axis": -1, "epsilon": eps})
    mask_index = None
    if _out(n, 1):
        if mask is None:  # no mask: every sequence counts as empty, as onnxruntime writes it
            zero = n.const(0, DType.INT32, hint="zero")
            rows = _one(n, "Unsqueeze", [_seq_len(n, ids, 0), n.const([0], DType.INT64, hint="axes")])
            mask_index = _one(n, "Expand", [zero, rows])
        else:
            ones = _one(n, "Equal", [mask, n.const(1, mask.dtype, hint="one")])  # onnxruntime counts the 1s
            counts = _one(n, "Cast", [ones], {"to": DType.INT32})
            mask_index = _one(n, "ReduceSum", [counts, n.const([1], DType.INT64, hint="axes")], {"keepdims": 0})
    return [y, mask_index, total]


# --- attention --------------------------------------------------------------------------------------------------


def _no_cache(n: NodeCtx, inputs: dict[int, str], outputs: dict[int, str]) -> None:
    for i, what in inputs.items():
        if n.input(i) is not None:
            raise n.fail(f"input {i} ({what}): key/value caches are not supported",
                         hint="export the model without past key/values (a full-sequence encoder or prefill)")
    for i, what in outputs.items():
        if _out(n, i):
            raise n.fail(f"output {i} ({what}): key/value caches are not supported",
                         hint="export the model without present key/values")


def _hidden_bias(n: NodeCtx, hide: Value, like: Value) -> Value:
    """0 where `hide` is false, mask_filter_value where it is true, in `like`'s float type."""
    fill = float(n.attr("mask_filter_value", MASK_FILTER_VALUE))
    return _one(n, "Where", [hide, _float_const(n, like, fill, "mask_filter"), _float_const(n, like, 0.0, "zero")])


def _key_mask(n: NodeCtx, mask: Value | None, bias: Value | None, q: Value, k: Value,
              axis: int = 1) -> Value | None:
    """The additive mask [B, 1, 1 or S, T] of a mask_index / key_padding_mask, plus attention_bias; the keys
    are k's axis `axis` (1 of [B, T, D], 2 of a present [B, N, T, H])."""
    out = None
    if mask is not None:
        b, t = q.shape[0] if q.shape else None, k.shape[axis] if k.shape else None
        if mask.rank == 1:
            if mask.shape is None or b is None or sym.equal(mask.shape[0], b) is not True:
                raise n.fail(f"a 1-D mask of shape {mask.shape} is taken as the keys' end per sequence [batch]; "
                             f"the [2 * batch] form (ends and starts) is not supported")
            end = _one(n, "Unsqueeze", [_one(n, "Cast", [mask], {"to": DType.INT64}),
                                        n.const([1], DType.INT64, hint="axes")])
            hide = _one(n, "GreaterOrEqual", [_positions(n, k, axis), end])  # [B, T]
            out = _hidden_bias(n, hide, q)
            axes = [1, 2]
        elif mask.rank in (2, 3):
            if mask.shape is not None and t is not None and sym.equal(mask.shape[-1], t) is False:
                raise n.fail(f"the mask's last dim {mask.shape[-1]} is not the keys' length {t}")
            out = _hidden_bias(n, _one(n, "Not", [_one(n, "Greater", [mask, n.const(0, mask.dtype, hint="zero")])]),
                               q)
            axes = [1, 2] if mask.rank == 2 else [1]
        else:
            raise n.fail(f"a mask of rank {mask.rank} is not supported (masks of shape [B], [B, T] or [B, S, T])")
        out = _one(n, "Unsqueeze", [out, n.const(axes, DType.INT64, hint="axes")])
    if bias is not None:
        out = bias if out is None else _one(n, "Add", [out, bias])
    return out


def _attend(n: NodeCtx, q: Value, k: Value, v: Value, heads: int, mask: Value | None) -> list[Value]:
    attrs = _scale(n, {"q_num_heads": heads, "kv_num_heads": heads})
    if n.attr("unidirectional", 0):
        attrs["is_causal"] = 1
    return [_one(n, "Attention", [q, k, v, mask], attrs)]


def _attend_cached(n: NodeCtx, q: Value, k: Value, v: Value, heads: int, past: tuple[Value, Value] | None,
                   mask: Value | None, bias: Value | None) -> list[Value]:
    """Attention with a key/value cache: present = past ++ the new keys/values ([B, N, P + S, H]); query i sits at
    position P + i, so `unidirectional` hides keys after it (a mask_filter_value bias, as onnxruntime adds).
    Returns [y [B, S, N * H], present_key, present_value]."""
    d = _head_size(n, q, heads)
    present_k, present_v = _bnsh(n, k, heads, d), _bnsh(n, v, heads, d)
    if past is not None:
        present_k = _one(n, "Concat", [past[0], present_k], {"axis": 2})
        present_v = _one(n, "Concat", [past[1], present_v], {"axis": 2})
    add = _key_mask(n, mask, bias, q, present_k, axis=2)
    if n.attr("unidirectional", 0):
        at = _positions(n, q, 1)
        if past is not None:
            at = _one(n, "Add", [at, _seq_len(n, past[0], 2)])
        later = _one(n, "Greater", [_one(n, "Unsqueeze", [_positions(n, present_k, 2),
                                                          n.const([0], DType.INT64, hint="axes")]),
                                    _one(n, "Unsqueeze", [at, n.const([1], DType.INT64, hint="axes")])])  # [S, T]
        causal = _hidden_bias(n, later, q)
        add = causal if add is None else _one(n, "Add", [add, causal])
    y = _one(n, "Attention", [_bnsh(n, q, heads, d), present_k, present_v, add], _scale(n, {}))  # [B, N, S, H]
    return [_merge_heads(n, y, heads * d), present_k, present_v]


def _scale(n: NodeCtx, attrs: dict[str, Any]) -> dict[str, Any]:
    """`attrs` with the node's `scale`, when it sets one (else Attention's 1/sqrt(head size))."""
    scale = float(n.attr("scale", 0.0) or 0.0)
    return {**attrs, "scale": scale} if scale else attrs


def _merge_heads(n: NodeCtx, y: Value, width: int) -> Value:
    """[B, N, S, H] -> [B, S, N * H = width]."""
    return _one(n, "Reshape", [_one(n, "Transpose", [y], {"perm": [0, 2, 1, 3]}),
                               n.const([0, 0, width], DType.INT64, hint="merge")])


def _head_size(n: NodeCtx, x: Value, heads: int) -> int:
    width = x.shape[2] if x.shape is not None and x.rank == 3 else None
    if not isinstance(width, int) or width % heads:
        raise n.fail(f"a key/value cache needs a static hidden size that num_heads {heads} divides, got {x.type}")
    return width // heads


def _heads(n: NodeCtx) -> int:
    heads = n.attr("num_heads")
    if not heads or int(heads) <= 0:
        raise n.fail("attribute num_heads is required")
    return int(heads)


@onnx_op("Attention", domain=MS)
def attention(n: NodeCtx) -> list[Value]:
    _no_cache(n, {6: "past_sequence_length"}, {})
    heads, x, w, sizes = _projection(n)
    qkv = _one(n, "MatMul", [x, w])
    if n.input(2) is not None:
        qkv = _one(n, "Add", [qkv, n.input(2)])
    return _attention_of(n, qkv, sizes, heads, n.input(3), n.input(4), n.input(5))


def _projection(n: NodeCtx) -> tuple[int, Value, Value, list[int]]:
    """Attention's and QAttention's heads, input [B, S, hidden], packed QKV weight and the Q, K, V widths."""
    if n.attr("do_rotary", 0):
        raise n.fail("rotary attention (do_rotary) is not supported")
    heads = _heads(n)
    x, w = _need(n, 0, "input"), _need(n, 1, "weights")
    if x.rank is not None and x.rank != 3:
        raise n.fail(f"input must be [batch, sequence, hidden], got {x.type}")
    return heads, x, w, _qkv_sizes(n, w, heads)


def _qkv_sizes(n: NodeCtx, w: Value, heads: int) -> list[int]:
    """The Q, K, V widths of a packed projection weight [hidden, qkv] (`qkv_hidden_sizes`, else thirds)."""
    if w.shape is None or len(w.shape) != 2 or not isinstance(w.shape[1], int):
        raise n.fail(f"weights must be [input_hidden, qkv_hidden] with a static width, got {w.type}")
    sizes = [int(s) for s in (n.attr("qkv_hidden_sizes") or [])] or [w.shape[1] // 3] * 3
    if len(sizes) != 3 or sum(sizes) != w.shape[1] or sizes[0] != sizes[1] or any(s % heads for s in sizes):
        raise n.fail(f"qkv_hidden_sizes {sizes} must be 3 sizes with Q = K, summing to the weights' width "
                     f"{w.shape[1]}, each a multiple of num_heads {heads}")
    return sizes


@onnx_op("QAttention", domain=MS)
def quantized_attention(n: NodeCtx) -> list[Value]:
    """Attention whose QKV projection is an 8-bit integer product (onnxruntime's dynamic quantization of an
    optimized BERT): input (uint8/int8, from DynamicQuantizeLinear), weight, bias, input_scale, weight_scale,
    mask_index?, input_zero_point?, weight_zero_point?, past?. The projection as that quantization writes a plain
    MatMul - MatMulInteger, Cast, times input_scale * weight_scale - then + bias and Attention's steps."""
    heads, x, w, sizes = _projection(n)
    acc = _one(n, "MatMulInteger", [x, w, n.input(6), n.input(7)])  # int32, exact
    scale = _one(n, "Mul", [_need(n, 3, "input_scale"), _need(n, 4, "weight_scale")])
    qkv = _one(n, "Mul", [_one(n, "Cast", [acc], {"to": DType.FLOAT32}), scale])
    if n.input(2) is not None:
        qkv = _one(n, "Add", [qkv, n.input(2)])
    return _attention_of(n, qkv, sizes, heads, n.input(5), n.input(8), None)


def _attention_of(n: NodeCtx, qkv: Value, sizes: list[int], heads: int, mask: Value | None, past: Value | None,
                  bias: Value | None) -> list[Value]:
    """Attention's steps after its QKV projection: the split, the cache (past [2, B, N, P, H] -> present), the
    masks."""
    q, k, v = n.emit("Split", [qkv, n.const(sizes, DType.INT64, hint="sizes")], {"axis": -1}, outputs=3)
    if past is not None or _out(n, 1):  # the cache: past [2, B, N, P, H] -> present [2, B, N, P + S, H]
        if past is not None and bias is not None:
            raise n.fail("past and attention_bias together (onnxruntime refuses them too)")
        halves = None
        if past is not None:
            pk, pv = n.emit("Split", [past, n.const([1, 1], DType.INT64, hint="halves")], {"axis": 0}, outputs=2)
            first = n.const([0], DType.INT64, hint="axes")
            halves = (_one(n, "Squeeze", [pk, first]), _one(n, "Squeeze", [pv, first]))
        y, pk, pv = _attend_cached(n, q, k, v, heads, halves, mask, bias)
        first = n.const([0], DType.INT64, hint="axes")
        present = _one(n, "Concat", [_one(n, "Unsqueeze", [pk, first]), _one(n, "Unsqueeze", [pv, first])],
                       {"axis": 0})
        return [y, present]
    return _attend(n, q, k, v, heads, _key_mask(n, mask, bias, q, k))


@onnx_op("MultiHeadAttention", domain=MS)
def multi_head_attention(n: NodeCtx) -> list[Value]:
    _no_cache(n, {8: "past_sequence_length", 9: "cache_indirection"}, {3: "qk"})
    heads = _heads(n)
    q, k, v = _need(n, 0, "query"), n.input(1), n.input(2)
    if k is None or v is None or q.rank != 3 or k.rank != 3 or v.rank != 3:
        raise n.fail("only the 3-D form is supported: query [B, S, D], key [B, L, D], value [B, L, Dv] "
                     "(not packed QKV/KV nor 4-D key/value)")
    bias = n.input(3)
    if bias is not None:
        d, dv = q.shape[2] if q.shape else None, v.shape[2] if v.shape else None
        if not isinstance(d, int) or not isinstance(dv, int):
            raise n.fail("a bias needs static hidden sizes for query and value")
        bq, bk, bv = n.emit("Split", [bias, n.const([d, d, dv], DType.INT64, hint="sizes")], {"axis": 0},
                            outputs=3)
        q, k, v = _one(n, "Add", [q, bq]), _one(n, "Add", [k, bk]), _one(n, "Add", [v, bv])
    past_k, past_v = n.input(6), n.input(7)
    if (past_k is None) != (past_v is None):
        raise n.fail("past_key and past_value are given together")
    if past_k is not None or _out(n, 1) or _out(n, 2):  # the cache: past [B, N, P, H] -> present [B, N, P + S, H]
        return _attend_cached(n, q, k, v, heads, None if past_k is None or past_v is None else (past_k, past_v),
                              n.input(4), n.input(5))
    mask = _key_mask(n, n.input(4), n.input(5), q, k)
    return _attend(n, q, k, v, heads, mask)


# --- rotary embedding -------------------------------------------------------------------------------------------


@onnx_op("RotaryEmbedding", domain=MS)
def rotary_embedding(n: NodeCtx) -> list[Value]:
    x, pos = _need(n, 0, "input"), _need(n, 1, "position_ids")
    cos, sin = _need(n, 2, "cos_cache"), _need(n, 3, "sin_cache")
    if int(n.attr("is_packed_batching", 0)):
        raise n.fail("packed batching (is_packed_batching=1) is not supported")
    if float(n.attr("scale", 1.0)) != 1.0:
        raise n.fail(f"scale={n.attr('scale', 1.0)} is not supported (only 1.0)")
    attrs: dict[str, Any] = {"interleaved": int(n.attr("interleaved", 0))}
    rot = int(n.attr("rotary_embedding_dim", 0))
    if rot:
        attrs["rotary_embedding_dim"] = rot
    heads = int(n.attr("num_heads", 0))
    if x.rank == 3 and not heads:  # heads as wide as the caches rotate (onnxruntime's rule)
        hidden, half = (x.shape[2] if x.shape else None), (cos.shape[1] if cos.shape and cos.rank == 2 else None)
        if not isinstance(hidden, int) or not isinstance(half, int) or rot or hidden % (2 * half):
            raise n.fail("a 3-D input needs num_heads (or static hidden and cache sizes)")
        heads = hidden // (2 * half)
    if heads:
        attrs["num_heads"] = heads
    if pos.rank == 1:  # the first position: S positions from it, shared by every sequence
        axis = 1 if x.rank == 3 else 2
        first = _one(n, "Reshape", [pos, n.const([1, 1], DType.INT64, hint="row")])
        pos = _one(n, "Add", [first, _one(n, "Unsqueeze", [_positions(n, x, axis),
                                                            n.const([0], DType.INT64, hint="axes")])])
    return [_one(n, "RotaryEmbedding", [x, cos, sin, pos], attrs)]


# --- weight-only quantized MatMul -------------------------------------------------------------------------------


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Rows of `bits`-bit unsigned values packed into bytes lowest bits first ([..., bytes] uint8), as int32
    [..., count]."""
    flat = packed.to(torch.int32).reshape(*packed.shape[:-1], -1)
    bit = torch.arange(8, dtype=torch.int32)
    stream = ((flat[..., :, None] >> bit) & 1).reshape(*flat.shape[:-1], -1)  # the bits, lowest first
    usable = stream.shape[-1] // bits * bits
    groups = stream[..., :usable].reshape(*stream.shape[:-1], -1, bits)
    values = (groups << torch.arange(bits, dtype=torch.int32)).sum(-1)
    return values[..., :count]


@onnx_op("MatMulNBits", domain=MS)
def matmul_nbits(n: NodeCtx) -> list[Value]:
    a = _need(n, 0, "A")
    k, cols, bits, block = (int(n.attr(name, d)) for name, d in (("K", 0), ("N", 0), ("bits", 4), ("block_size", 0)))
    if not 2 <= bits <= 8 or block < 16 or block & (block - 1) or k <= 0 or cols <= 0:
        raise n.fail(f"K={k}, N={cols}, bits={bits}, block_size={block}: expected bits in 2..8, a power-of-two "
                     "block_size >= 16 and positive K and N")
    if n.input(4) is not None:
        raise n.fail("g_idx (act-order groups) is not supported")
    b, scales = const_value(_need(n, 1, "B")), const_value(_need(n, 2, "scales"))
    zp_in = n.input(3)
    zp = const_value(zp_in) if zp_in is not None else None
    if not isinstance(b, torch.Tensor) or not isinstance(scales, torch.Tensor) or (zp_in is not None and
                                                                                   not isinstance(zp, torch.Tensor)):
        raise n.fail("B, scales and zero_points must be constants (the weight is dequantized at import)")
    blocks = math.ceil(k / block)
    q = _unpack(b.reshape(cols, blocks, -1), bits, block).reshape(cols, blocks * block)
    if zp is None:
        z = torch.full((cols, blocks), float(1 << (bits - 1)))
    elif zp.dtype == torch.uint8:  # packed like the weight, a row of zero points per output column
        z = _unpack(zp.reshape(cols, -1), bits, blocks).to(torch.float64)
    else:
        z = zp.reshape(cols, blocks).to(torch.float64)
    scale = scales.reshape(cols, blocks).to(torch.float64)
    w = (q.to(torch.float64).reshape(cols, blocks, block) - z[..., None]) * scale[..., None]
    weight = w.reshape(cols, blocks * block)[:, :k].t().contiguous()  # [K, N]
    y = _one(n, "MatMul", [a, n.const(weight.to(a.dtype.torch), a.dtype, hint="weight")])
    bias = n.input(5)
    return [y if bias is None else _one(n, "Add", [y, bias])]


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


def _bnsh(n: NodeCtx, x: Value, heads: int, d: int) -> Value:
    """[B, S, heads * d] -> [B, heads, S, d]."""
    split = _one(n, "Reshape", [x, n.const([0, 0, heads, d], DType.INT64, hint="heads")])
    return _one(n, "Transpose", [split], {"perm": [0, 2, 1, 3]})


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
