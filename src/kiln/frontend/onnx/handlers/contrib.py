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
- RotaryEmbedding(input, position_ids, cos_cache, sin_cache; interleaved, num_heads, rotary_embedding_dim): the
  ONNX RotaryEmbedding with its inputs reordered; position_ids [B, S], or [1] - the first position, the rest
  following it; a 3-D input without num_heads has heads of twice the cache's width (or rotary_embedding_dim).

The ops of onnxruntime-genai's LLM exports (GroupQueryAttention, MoE, QMoE, CausalConvWithState) are in `llm.py`,
the QOperator-format quantized ops in `qoperator.py`.

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


def _bnsh(n: NodeCtx, x: Value, heads: int, d: int) -> Value:
    """[B, S, heads * d] -> [B, heads, S, d]."""
    split = _one(n, "Reshape", [x, n.const([0, 0, heads, d], DType.INT64, hint="heads")])
    return _one(n, "Transpose", [split], {"perm": [0, 2, 1, 3]})


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
