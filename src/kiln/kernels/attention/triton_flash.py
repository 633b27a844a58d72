"""`triton.flash_attention`: the Attention op as one Triton kernel in the manner of FlashAttention-2.

One program computes a block of BLOCK_M query rows of one (batch, head): it streams the keys and values in blocks
of BLOCK_N, keeps the running row maximum and sum of the softmax and the output accumulator in float32 (online
softmax) and writes the normalized rows once; the [Sq, Skv] score matrix never reaches memory.

Takes 4-D [batch, heads, seq, head] or packed 3-D [batch, seq, heads*head] Q/K/V of one dtype (float16, bfloat16,
float32), read through their strides; grouped-query K/V (query head h reads kv head h // (H / Hkv)); `is_causal`
(query i sees keys j <= i, whole key blocks past the diagonal are skipped); a boolean or float additive attn_mask
broadcastable to [batch, heads, Sq, Skv] (read through its strides, 0 on broadcast axes; a mask narrower than Skv
hides the keys past it, as the reference pads it with -inf); any scale; a softcap (Gemma-2: scores = softcap *
tanh(scores / softcap), before the mask); head sizes up to 256 (padded to a power of two); any sequence lengths.
A query row with no allowed key gives zeros, as in the reference.
With a key/value cache (past_key/value) the tactic concatenates it before the new keys (the present_key/value
outputs) and the kernel shifts the causal diagonal by its length.
Left to other tactics: nonpad_kv_seqlen, sliding windows, the QK output,
softmax_precision other than float32 (the kernel's softmax is float32; the reference's default, Q's dtype, is
matched within the tuner's tolerance), integer masks.

Precision: Q is multiplied by the scale (and log2(e)) in float32 and rounded to its dtype once, the products
accumulate in float32 (float32 inputs use 3xTF32, about float32 accuracy), P is rounded to V's dtype for the
second product. With a float mask and half inputs the biased score is rounded as the reference rounds it, so a
row hidden by finite values (-65504, finfo.min) softmaxes to the same near-uniform row rather than to zeros.

This module imports no triton until a kernel is built: the kernel functions below are plain Python until
`_kernel()` binds `tl` and wraps them with `triton.jit`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, TensorType, Value
from kiln.kernels import pdl
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.norm.common import next_pow2, quantizing_view, reference, separate_quantize, triton_available
from kiln.kernels.registry import register

FLOATS = frozenset({DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16})
MASK_DTYPES = FLOATS | {DType.FLOAT64, DType.BOOL}
MAX_HEAD = 256
LOG2E = 1.4426950408889634
NO_MASK, BOOL_MASK, FLOAT_MASK = 0, 1, 2
SMEM_BUDGET = 160 * 1024
"""Bytes of shared memory a launch may plan for (Q tile + num_stages K/V tiles); an H100 block may use 227 KiB,
the rest is left to the compiler's own buffers."""
INT32_MAX = 2**31 - 1

CONFIGS: tuple[dict[str, int], ...] = (
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 2, "num_stages": 3},
)
"""The configurations the tuner times, first = the untimed default (not yet measured on a GPU):
- 128 x 64, 4 warps: the usual best for head size 64 in fp16 on an H100 at BERT-base / ViT-B batch 128;
- 128 x 128, 8 warps: longer key blocks, fewer loop trips;
- 64 x 64 and 64 x 128: twice the programs, for small batches and ragged lengths (197 = 3 x 64 + 5);
- 128 x 32, 4 stages: more loads in flight for a short head;
- 32 x 64, 2 warps: four times the programs, for batch 1.
`plan()` shrinks a config to the problem: a tile no taller than the query (16 rows for decode), no longer than the
keys, and within the register and shared-memory budgets for large heads or float32."""


# --- the kernel (plain Python until _kernel() wraps it; `tl` is bound there) -------------------------------------

tl: Any = None
quantize_tile: Any = None  # `triton_kernels.quantize_tile`, bound by _kernel()
tanh: Any = None  # `mathlib.tanh`, bound by _kernel()
pdl_sync: Any = None  # `mathlib.pdl_sync`, bound by _kernel()


def _attend(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, start_n, SQ, SKV, MASK_W, skn, skd, svn, svd,
            smm, smn, cap, past, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EDGE: tl.constexpr, CAUSAL: tl.constexpr,
            MASK_KIND: tl.constexpr, KEY_MASK: tl.constexpr, ROUND: tl.constexpr, UNITS: tl.constexpr,
            PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    """One key block: scores, softcap, mask, online-softmax update of (acc, l_i, m_i). EDGE: the block may hold
    keys past Skv or (causal) past the diagonal - key j is visible to query i when j <= i + past, `past` the length
    of the key/value cache the keys start with - which are hidden element by element. KEY_MASK: the mask is the
    same for every query (a padding mask, [B, 1, 1, Skv]): one row of it is read per key block, not a tile.
    SOFTCAP: the scores (in natural units then) become cap * tanh(scores / cap)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ok = (offs_d < HEAD_D)[None, :]
    v_ok = (offs_dv < HEAD_DV)[None, :]
    if EDGE:
        k_ok = k_ok & (offs_n < SKV)[:, None]
        v_ok = v_ok & (offs_n < SKV)[:, None]
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=k_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if SOFTCAP:
        s = cap * tanh(s / cap)
    if MASK_KIND != 0:
        if KEY_MASK:  # why: a [BLOCK_M, BLOCK_N] float bias tile held beside the scores spills registers
            m_ptrs = mask_base + offs_n[None, :] * smn
            m_ok = (offs_n < MASK_W)[None, :]
        else:
            m_ptrs = mask_base + offs_m[:, None] * smm + offs_n[None, :] * smn
            m_ok = (offs_m < SQ)[:, None] & (offs_n < MASK_W)[None, :]
        if MASK_KIND == 1:
            s = tl.where(tl.load(m_ptrs, mask=m_ok, other=0) != 0, s, float("-inf"))
        else:
            bias = tl.load(m_ptrs, mask=m_ok, other=float("-inf")).to(q.dtype).to(tl.float32)
            if ROUND:
                s = (s.to(q.dtype).to(tl.float32) + bias).to(q.dtype).to(tl.float32)
            else:
                s = s + bias
    if EDGE:
        keep = (offs_n < SKV)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + past)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # why: a row that has seen no allowed key yet keeps m = -inf; exp2(-inf - -inf) would be NaN
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_ref) * UNITS)
    p = tl.exp2((s - m_ref[:, None]) * UNITS)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd, mask=v_ok, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i, m_new


def _flash_fwd(Q, K, V, M, O, QO, q_scale, q_rscale, q_zero, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn,
               svd, smb, smh, smm, smn, sob, soh, som, sod, H, GROUP, SQ, SKV, MASK_W, q_mul, num_m, cap, past,
               HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               KEY_MASK: tl.constexpr, ROUND: tl.constexpr, UNITS: tl.constexpr, PREC: tl.constexpr,
               STORE_Y: tl.constexpr, YD: tl.constexpr, QUANT: tl.constexpr, SD: tl.constexpr, QLO: tl.constexpr,
               QHI: tl.constexpr, PDL: tl.constexpr, SOFTCAP: tl.constexpr):
    pdl_sync(PDL)  # why: with PDL on (kiln.kernels.pdl), this kernel may start before the one before it ends
    pid = tl.program_id(0)
    pid_m = pid % num_m
    if CAUSAL:  # why: the last query blocks have the most keys; starting them first shortens the tail
        pid_m = num_m - 1 - pid_m
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_m < SQ)[:, None] & (offs_d < HEAD_D)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_ok, other=0.0)
    q = (q.to(tl.float32) * q_mul).to(Q.dtype.element_ty)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    mask_base = M + b * smb + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if CAUSAL:
        hi = tl.minimum(SKV, start_m + BLOCK_M + past)
        full = tl.minimum(start_m + past, hi) // BLOCK_N * BLOCK_N  # keys below start_m + past: every row's
    else:
        hi = SKV
        full = SKV // BLOCK_N * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, start_n, SQ, SKV, MASK_W,
                                skn, skd, svn, svd, smm, smn, cap, past, HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D,
                                BLOCK_DV, False, CAUSAL, MASK_KIND, KEY_MASK, ROUND, UNITS, PREC, SOFTCAP)
    for start_n in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, start_n, SQ, SKV, MASK_W,
                                skn, skd, svn, svd, smm, smn, cap, past, HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D,
                                BLOCK_DV, True, CAUSAL, MASK_KIND, KEY_MASK, ROUND, UNITS, PREC, SOFTCAP)
    # a row with no allowed key has l = 0 and acc = 0: it gives zeros, as in the reference
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ok = (offs_m < SQ)[:, None] & (offs_dv < HEAD_DV)[None, :]
    o_at = b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    if STORE_Y:
        tl.store(O + o_at, out.to(O.dtype.element_ty), mask=o_ok)
    if QUANT > 0:  # the quantizing form: QO is laid out as O
        yq = quantize_tile(out, q_scale, q_rscale, q_zero, YD, QUANT, SD, QLO, QHI)
        tl.store(QO + o_at, yq.to(QO.dtype.element_ty), mask=o_ok)


@functools.cache
def _kernel() -> Any:
    """The jitted kernel; imports triton (TRITON_INTERPRET must be set before this runs, for the interpreter)."""
    import triton
    import triton.language

    from kiln.kernels.norm.triton_kernels import quantize_tile
    from kiln.kernels.pointwise.mathlib import pdl_sync
    from kiln.kernels.pointwise.mathlib import tanh as tanh_fn

    g = globals()
    g["tl"] = triton.language
    g["quantize_tile"] = quantize_tile
    g["tanh"] = tanh_fn
    g["pdl_sync"] = pdl_sync
    # why: the kernel body calls `_attend` by its global name, which must then be a jitted function
    g["_attend"] = triton.jit(_attend)
    return triton.jit(_flash_fwd)


# --- the launcher ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def plan(config: dict[str, Any], sq: int, skv: int, block_d: int, block_dv: int, elem: int) -> Launch:
    """`config` fitted to the problem: tiles no larger than the sequences (16 at least, tl.dot's minimum), an
    accumulator of at most 64 float32 registers a thread, K/V stages within the shared-memory budget."""
    bm = min(config["BLOCK_M"], max(16, next_pow2(sq)))
    bn = min(config["BLOCK_N"], max(16, next_pow2(skv)))
    warps, stages = config["num_warps"], config["num_stages"]
    warps = max(warps, min(8, bm * block_dv // 2048))
    while bm > 16 and bm * block_dv > 2048 * warps:
        bm //= 2

    def smem(bn: int, stages: int) -> int:
        return (bm * block_d + stages * bn * (block_d + block_dv)) * elem

    while stages > 1 and smem(bn, stages) > SMEM_BUDGET:
        stages -= 1
    while bn > 16 and smem(bn, stages) > SMEM_BUDGET:
        bn //= 2
    return Launch(bm, bn, warps, stages)


def _heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, heads*D] -> a [B, heads, S, D] view (no copy when the last axis is contiguous)."""
    return x.unflatten(2, (heads, x.shape[2] // heads)).transpose(1, 2)


def _mask_view(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, int, int]:
    """attn_mask as a [B, H, Sq, width] view (stride 0 on broadcast axes), its width and its kind."""
    b, h, sq, skv = shape
    if mask.dim() == 0:  # a scalar bias covers every key: the reference pads only masks with a key axis
        mask = mask.reshape(1).expand(skv)
    if mask.dim() > 4:
        raise ValueError(f"attn_mask must have rank <= 4, got shape {list(mask.shape)}")
    width = mask.shape[-1]
    if width > skv:
        raise ValueError(f"attn_mask covers {width} keys, more than the {skv} keys of K")
    m4 = mask[(None,) * (4 - mask.dim())].expand(b, h, sq, width)
    if mask.dtype == torch.bool:
        return m4.view(torch.uint8), width, BOOL_MASK
    if not mask.dtype.is_floating_point:
        raise ValueError(f"attn_mask must be bool or a float type for this kernel, got {mask.dtype}")
    return m4, width, FLOAT_MASK


def _check_offsets(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Offsets inside one (batch, head) are 32-bit in the kernel (the batch and head offsets are 64-bit)."""
    for name, t in named:
        reach = sum((n - 1) * abs(s) for n, s in zip(t.shape[2:], t.stride()[2:]))
        if reach > INT32_MAX:
            raise ValueError(f"{name} spans {reach} elements within one head, past the kernel's 32-bit offsets")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                    causal: bool, scale: float | None, heads: tuple[int | None, int | None],
                    config: dict[str, Any], quant: Any = None, softcap: float = 0.0,
                    past: int = 0) -> list[torch.Tensor]:
    """Attention of non-empty Q/K/V, 4-D [B, H, S, D] or packed 3-D [B, S, H*D] (`heads` = (H, Hkv) then); the
    output has Q's dtype and the reference's layout: [B, H, Sq, Dv], or [B, Sq, H*Dv] for packed inputs. `past`:
    the keys' first `past` positions are a cache, so causal query i sees keys j <= i + past. With
    `quant` (a `triton_kernels.Quantize`), also that output quantized (and the float output only if it keeps Y):
    returns [Y] or [Y, Y quantized] or [Y quantized]."""
    packed = q.dim() == 3
    if packed:
        qh, kvh = heads
        if qh is None or kvh is None:
            raise ValueError("packed 3-D Q/K/V need q_num_heads and kv_num_heads")
        q, k, v = _heads_view(q, qh), _heads_view(k, kvh), _heads_view(v, kvh)
    b, h, sq, d = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
    if k.shape[0] != b or tuple(v.shape[:3]) != (b, hkv, skv) or k.shape[3] != d:
        raise ValueError(f"Q {list(q.shape)}, K {list(k.shape)} and V {list(v.shape)} do not fit together")
    if hkv == 0 or h % hkv or max(d, dv) > MAX_HEAD:
        raise ValueError(f"needs H ({h}) a multiple of Hkv ({hkv}) and head sizes <= {MAX_HEAD} (got {d}, {dv})")
    from kiln.kernels.norm.triton_kernels import quantize_flags

    shape = (b, sq, h * dv) if packed else (b, h, sq, dv)
    keep_y = quant is None or quant.keep_y
    made = ([torch.empty(shape, dtype=q.dtype, device=q.device)] if keep_y else []) + \
        ([] if quant is None else [torch.empty(shape, dtype=quant.out, device=q.device)])
    views = [_heads_view(t, h) if packed else t for t in made]
    o, qo = views[0], views[-1]  # the float output (or, without it, the quantized one: same strides)
    if mask is None:
        m4, width, kind = q, 0, NO_MASK  # why: any pointer; the kernel reads no mask then
        m_strides: tuple[int, ...] = (0, 0, 0, 0)
    else:
        m4, width, kind = _mask_view(mask, (b, h, sq, skv))
        m_strides = m4.stride()
    _check_offsets([("Q", q), ("K", k), ("V", v), ("attn_mask", m4), ("Y", o)])
    block_d, block_dv = max(16, next_pow2(d)), max(16, next_pow2(dv))
    p = plan(config, sq, skv, block_d, block_dv, q.element_size())
    num_m = -(-sq // p.block_m)
    half = q.dtype in (torch.float16, torch.bfloat16)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # why: with a float mask the scores stay in natural units (a huge finite bias times log2(e) would overflow),
    # and with a softcap (tanh of the natural score); otherwise log2(e) rides on Q and the softmax is exp2 of the
    # scores as they come
    natural = kind == FLOAT_MASK or softcap > 0
    units = LOG2E if natural else 1.0
    q_mul = scale if natural else scale * LOG2E
    _kernel()[(num_m * b * h,)](
        q, k, v, m4, o, qo, *((1.0, 1.0, 0.0) if quant is None else (quant.scale, quant.reciprocal, quant.zero)),
        *q.stride(), *k.stride(), *v.stride(), *m_strides, *o.stride(),
        h, h // hkv, sq, skv, width, q_mul, num_m, float(softcap) if softcap > 0 else 1.0, past,
        HEAD_D=d, HEAD_DV=dv, BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        CAUSAL=causal, MASK_KIND=kind, KEY_MASK=kind != NO_MASK and m_strides[2] == 0,
        ROUND=half and kind == FLOAT_MASK, UNITS=units,
        PREC="tf32" if half else "tf32x3", STORE_Y=keep_y, **quantize_flags(quant, q.dtype),
        num_warps=p.num_warps, num_stages=p.num_stages, SOFTCAP=softcap > 0, **pdl.launch_options())
    return made


# --- the tactic --------------------------------------------------------------------------------------------------


def _tensor(v: Value | None) -> TensorType | None:
    return v.type if v is not None and isinstance(v.type, TensorType) else None


def _cache_ok(node: Node) -> bool:
    """No nonpad_kv_seqlen and no QK output; past_key and past_value both or neither, 4-D of K's and V's dtypes."""
    ins, outs = node.inputs, node.outputs
    if len(outs) > 3 or len(ins) > 7 or (len(ins) > 6 and ins[6] is not None):
        return False
    past = [v for v in ins[4:6] if v is not None]
    if not past:
        return len(outs) == 1
    types = [_tensor(v) for v in (*past, ins[1], ins[2])]
    if len(past) != 2 or any(t is None for t in types):
        return False
    pk, pv, k, v = (t for t in types if t is not None)
    return pk.rank == 4 and pv.rank == 4 and pk.dtype == k.dtype and pv.dtype == v.dtype


def _head_sizes(node: Node, types: list[TensorType]) -> tuple[Any, Any]:
    q, v = types[0].shape, types[2].shape
    assert q is not None and v is not None
    if len(q) == 4:
        return q[3], v[3]
    qh, kvh = node.attrs["q_num_heads"], node.attrs["kv_num_heads"]
    if not qh or not kvh or not isinstance(q[2], int) or not isinstance(v[2], int) or q[2] % qh or v[2] % kvh:
        return None, None
    return q[2] // qh, v[2] // kvh


class TritonFlashAttention(Tactic):
    name = "triton.flash_attention"
    # GPU-verified (H100, triton 3.6). In default builds since 2026-11-27: BERT-base's masked attention has no
    # flash backend in torch (cuda.sdpa takes 80 us a layer at batch 128); this beat it by 2-19 us a layer, for six
    # compiles per attention shape
    min_opt_level = 3
    ops = frozenset({"Attention"})
    devices = frozenset({"cuda"})
    space: ClassVar[dict[str, Sequence[Any]]] = {k: sorted({c[k] for c in CONFIGS}, reverse=True)
                                                 for k in CONFIGS[0]}
    """The values each parameter takes; `configs()` lists the combinations timed (CONFIGS), not the product."""
    priority = 60

    def configs(self) -> list[dict[str, Any]]:
        return [dict(c) for c in CONFIGS]

    def applicable(self, node: Node, device: torch.device) -> bool:
        a = node.attrs
        if device.type not in self.devices or node.op not in self.ops or not triton_available():
            return False
        if not _cache_ok(node):
            return False
        if a["left_window_size"] >= 0 or a["right_window_size"] >= 0 or a["qk_matmul_output_mode"]:
            return False
        if a["softmax_precision"] not in (None, DType.FLOAT32):
            return False
        types = [_tensor(v) for v in node.inputs[:3]]
        if any(t is None or t.dtype not in FLOATS or t.rank not in (3, 4) for t in types):
            return False
        tts = [t for t in types if t is not None]
        if len({t.dtype for t in tts}) != 1 or len({t.rank for t in tts}) != 1:
            return False
        d, dv = _head_sizes(node, tts)
        if not all(isinstance(x, int) and 0 < x <= MAX_HEAD for x in (d, dv)):
            return False
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        if mask is not None:
            mt = _tensor(mask)
            if mt is None or mt.dtype not in MASK_DTYPES or mt.rank is None or mt.rank > 4:
                return False
        return True

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        a = node.attrs
        causal, scale, cap = bool(a["is_causal"]), a["scale"], float(a["softcap"])
        heads = (a["q_num_heads"], a["kv_num_heads"])
        fallback = reference(node)
        cached = len(node.inputs) > 4 and node.inputs[4] is not None
        outputs = len(node.outputs)

        def run(xs: list[Any]) -> list[Any]:
            q, k, v = xs[0], xs[1], xs[2]
            mask = xs[3] if len(xs) > 3 else None
            if not cached:
                if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
                    return fallback(xs)  # why: an empty grid or an empty softmax; the reference defines both
                return flash_attention(q, k, v, mask, causal=causal, scale=scale, heads=heads, config=config,
                                       softcap=cap)
            packed = q.dim() == 3
            if packed:  # why: the cache is [B, Hkv, P, D]; the new keys join it head by head
                q, k, v = _heads_view(q, heads[0]), _heads_view(k, heads[1]), _heads_view(v, heads[1])
            past_k, past_v = xs[4], xs[5]
            present_k, present_v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            if q.numel() == 0 or present_k.numel() == 0 or present_v.numel() == 0:
                return fallback(xs)[:outputs]
            (y,) = flash_attention(q, present_k, present_v, mask, causal=causal, scale=scale, heads=(None, None),
                                   config=config, softcap=cap, past=past_k.shape[2])
            if packed:
                y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
            return [y, present_k, present_v][:outputs]

        return run


class TritonFlashAttentionQuantize(Tactic):
    """A "quantizing" Fused node (`kiln.precision.quantize.fuse_output_quantize`): an Attention that
    `triton.flash_attention` takes and the per-tensor QuantizeLinear of its output, as the flash kernel storing the
    8-bit values (int8, uint8 or float8 E4M3; and the float output when the node has it): the next layer's input
    without a quantize pass over the attention's output. `quantize` "separate" runs the flash kernel, then the
    QuantizeLinear's own kernel (what the graph ran before the fusion), so the tuner always has that choice."""

    name = "triton.flash_attention_quantize"
    ops = frozenset({"Fused"})
    devices = frozenset({"cuda"})
    space: ClassVar[dict[str, Sequence[Any]]] = {**TritonFlashAttention.space, "quantize": ["fused", "separate"]}
    priority = 60

    def configs(self) -> list[dict[str, Any]]:  # 12: few enough that the default level times them all
        return [{**c, "quantize": how} for how in ("fused", "separate") for c in CONFIGS]

    def applicable(self, node: Node, device: torch.device) -> bool:
        view = quantizing_view(node, ("Attention",))
        return (view is not None and len(view.op.inputs) <= 4 and len(view.op.outputs) == 1
                and _FLASH.applicable(view.op, device))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        from kiln.kernels.norm.triton_kernels import Quantize

        view = quantizing_view(node, ("Attention",))
        assert view is not None
        att = view.op
        a = att.attrs
        causal, scale, cap = bool(a["is_causal"]), a["scale"], float(a["softcap"])
        heads = (a["q_num_heads"], a["kv_num_heads"])
        at = [None if v is None else view.at[v] for v in att.inputs[:4]]
        quant = Quantize.of(view)
        separate = separate_quantize(view, device) if config.get("quantize") == "separate" else None
        fallback = reference(node)

        def run(xs: list[Any]) -> list[Any]:
            q, k, v = (xs[i] for i in at[:3])  # type: ignore[index]
            mask = xs[at[3]] if len(at) > 3 and at[3] is not None else None
            if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
                return fallback(xs)
            if separate is None:
                return flash_attention(q, k, v, mask, causal=causal, scale=scale, heads=heads, config=config,
                                       quant=quant, softcap=cap)
            (y,) = flash_attention(q, k, v, mask, causal=causal, scale=scale, heads=heads, config=config,
                                   softcap=cap)
            return ([y] if view.keep_y else []) + separate([y])

        return run


_FLASH = TritonFlashAttention()
register(_FLASH)
register(TritonFlashAttentionQuantize())
