"""The Triton kernels of the norm family and their launchers. Imported only when a tactic is built (triton is
optional). Every kernel reads its input once and writes its output once when a row fits in registers; longer rows
are streamed (statistics in one read, then a read and a write).

Math runs in float32; where the reference rounds an intermediate to a half type (the ONNX function bodies of
(Log)Softmax, the affine steps of the normalizations), the kernels round at the same place (`_rd` with a
constexpr dtype: float32 makes it a no-op), so half-precision results match the reference bit for bit but for
float32 rounding noise. Offsets are int64: row index times row length may pass 2**31."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels import pdl
from kiln.kernels.norm.common import QuantizedOutput, grid_rows, next_pow2, plan, promote, warps
from kiln.kernels.pointwise import mathlib as km

TL: dict[torch.dtype, Any] = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
NO_FUSION = {"enable_fp_fusion": False}
"""why: the compiler would otherwise fuse `round(a * b) + c` (computed in half precision once it sees the
rounding) into one FMA, dropping the rounding of the product that the reference does."""


def _options() -> dict[str, Any]:
    """Every launch's options: NO_FUSION, and the kernel's PDL constexpr with the dependent launch when PDL is on
    (each kernel starts with `km.pdl_sync(PDL)`, `kiln.kernels.pdl`)."""
    return {**NO_FUSION, **pdl.launch_options()}


@triton.jit
def _rd(x, DT: tl.constexpr):
    """x rounded to DT and widened back to float32 (what a step that produces DT does to its result)."""
    return x.to(DT).to(tl.float32)


@triton.jit
def _welford_combine(m1, q1, n1, m2, q2, n2):
    # Chan et al.: merge (mean, sum of squared deviations, count) of two disjoint parts.
    n = n1 + n2
    w = tl.where(n > 0, n2 / tl.where(n > 0, n, 1.0), 0.0)
    d = m2 - m1
    return m1 + d * w, q1 + q2 + d * d * n1 * w, n


@triton.jit
def _welford(ptr, lo, hi, BLOCK: tl.constexpr):
    """(mean, sum of squared deviations, count) of ptr[lo:hi] in float32, one pass of BLOCK-lane chunks."""
    lanes = tl.arange(0, BLOCK)
    mean = tl.zeros([BLOCK], tl.float32)
    m2 = tl.zeros([BLOCK], tl.float32)
    cnt = tl.zeros([BLOCK], tl.float32)
    for k in range(0, tl.cdiv(hi - lo, BLOCK)):
        idx = lo + k * BLOCK + lanes
        mask = idx < hi
        x = tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)
        cnt += mask.to(tl.float32)
        d = x - mean
        # every chunk but the last is full, so each live lane has seen k + 1 elements
        mean += tl.where(mask, d * (1.0 / (k + 1.0)), 0.0)
        m2 += tl.where(mask, d * (x - mean), 0.0)
    return tl.reduce((mean, m2, cnt), 0, _welford_combine)


# --- softmax ------------------------------------------------------------------------------------------------


@triton.jit
def _softmax_rows(x_ptr, y_ptr, n_rows, n, LOG: tl.constexpr, RD: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK: tl.constexpr, PDL: tl.constexpr):
    km.pdl_sync(PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n)[None, :]
    offs = rows[:, None] * n + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
    # a row of -inf gives -inf - -inf = NaN everywhere, as in the reference
    s = _rd(x - tl.max(x, axis=1)[:, None], RD)
    e = tl.where(mask, _rd(tl.exp(s), RD), 0.0)
    total = _rd(tl.sum(e, axis=1), RD)
    if LOG:
        y = s - _rd(tl.log(total), RD)[:, None]
    else:
        y = tl.div_rn(e, tl.zeros_like(e) + total[:, None])
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_looped(x_ptr, y_ptr, n, LOG: tl.constexpr, RD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    km.pdl_sync(PDL)
    base = tl.program_id(0).to(tl.int64) * n
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], -float("inf"), tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        x = tl.load(x_ptr + base + start + cols, mask=start + cols < n, other=-float("inf")).to(tl.float32)
        new = tl.maximum(m, x)
        # online softmax: rescale the running sum to the new maximum (0, not NaN, while that is -inf)
        safe = tl.where(new == -float("inf"), 0.0, new)
        acc = acc * tl.exp(m - safe) + tl.exp(x - safe)
        m = new
    mx = tl.max(m, axis=0)
    safe = tl.where(mx == -float("inf"), 0.0, mx)
    # why: unlike the reference, the sum adds exp() unrounded (rounding needs the final maximum, a third read);
    # the rounded total differs from the reference's by at most one unit in the last place, and rarely
    total = _rd(tl.sum(acc * tl.exp(m - safe), axis=0), RD)
    for start in range(0, n, BLOCK):
        mask = start + cols < n
        x = tl.load(x_ptr + base + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        s = _rd(x - mx, RD)  # a row of -inf gives -inf - -inf = NaN, as in the reference
        if LOG:
            y = s - _rd(tl.log(total), RD)
        else:
            y = tl.div_rn(_rd(tl.exp(s), RD), tl.zeros_like(s) + total)
        tl.store(y_ptr + base + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def softmax(x: torch.Tensor, log: bool, config: dict[str, Any]) -> torch.Tensor:
    """(Log)Softmax of a non-empty tensor over its last axis."""
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    y = torch.empty_like(x)
    p = plan(n, config)
    rd = TL[x.dtype]
    if p.looped:
        _softmax_looped[(rows,)](x, y, n, LOG=log, RD=rd, BLOCK=p.block, num_warps=p.num_warps, **_options())
    else:
        _softmax_rows[grid_rows(rows, p)](x, y, rows, n, LOG=log, RD=rd, ROWS=p.rows, BLOCK=p.block,
                                          num_warps=p.num_warps, **_options())
    return y


# --- layer norm / RMS norm ------------------------------------------------------------------------------------


@triton.jit
def _affine(v, w, b, RMS: tl.constexpr, HAS_B: tl.constexpr, XD: tl.constexpr, PD: tl.constexpr,
            QD: tl.constexpr):
    """Normalized v (float32) -> output, rounding as the reference: LayerNorm `v.to(X) * Scale (+ B)` with the
    product in PD and the sum in QD; RMSNorm `v.to(X).to(scale) * scale` (PD = scale's dtype)."""
    v = _rd(v, XD)
    if RMS:
        return _rd(v, PD) * w
    y = _rd(v * w, PD)
    if HAS_B:
        y = _rd(y + b, QD)
    return y


@triton.jit
def quantize_tile(y, scale, rscale, zero, YD: tl.constexpr, QUANT: tl.constexpr, SD: tl.constexpr,
                  QLO: tl.constexpr, QHI: tl.constexpr):
    """QuantizeLinear of a kernel's result y (float32 holding Y's values; shared with the quantizing attention) as
    the reference computes it: Y / scale in the scale's type SD (a float32 quotient rounded once to SD is SD's
    exactly rounded quotient; `km.quotient`, from the scale's float32 reciprocal `rscale`, `Quantize.reciprocal`),
    then QUANT 1: round half to even, + zero, clamped to [QLO, QHI] (int8/uint8), returned as an int32 whose low
    byte is the code (the caller's store to 8 bits keeps it); QUANT 2: saturated to float8 E4M3's +-448, NaN kept
    (the caller's float8 store rounds to nearest even)."""
    q = _rd(km.quotient(_rd(_rd(y, YD), SD), scale, rscale), SD)
    if QUANT == 2:  # why: an if/else on the constexpr - one branch is compiled, so the result has one type
        r = tl.where(q != q, q, tl.minimum(tl.maximum(q, -448.0), 448.0))
    else:
        r = km.round_to_8bit(q, QLO, QHI, zero)
    return r


@triton.jit
def _layernorm_rows(x_ptr, r_ptr, s_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, q_ptr, q_scale, q_rscale, q_zero,
                    n_rows, n,
                    eps, RES: tl.constexpr, RMS: tl.constexpr, HAS_B: tl.constexpr, STATS: tl.constexpr,
                    XD: tl.constexpr, PD: tl.constexpr, QD: tl.constexpr, STORE_Y: tl.constexpr, YD: tl.constexpr,
                    QUANT: tl.constexpr, SD: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    km.pdl_sync(PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    live = rows < n_rows
    cmask = cols < n
    mask = live[:, None] & cmask[None, :]
    offs = rows[:, None] * n + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RES > 0:  # the norm of x + r, the sum rounded to X's type as the Add makes it (RES 2: written too)
        x = _rd(x + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32), XD)
        if RES == 2:
            tl.store(s_ptr + offs, x.to(s_ptr.dtype.element_ty), mask=mask)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    b = w
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if RMS:
        v = tl.div_rn(x, tl.sqrt_rn(tl.sum(x * x, axis=1) / n + eps)[:, None])
    else:
        mean = tl.sum(x, axis=1) / n
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(d * d, axis=1) / n + eps))
        v = d * rstd[:, None]
        if STATS:
            tl.store(mean_ptr + rows, mean, mask=live)
            tl.store(rstd_ptr + rows, rstd, mask=live)
    y = _affine(v, w, b, RMS, HAS_B, XD, PD, QD)
    if STORE_Y:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if QUANT > 0:
        yq = quantize_tile(y, q_scale, q_rscale, q_zero, YD, QUANT, SD, QLO, QHI)
        tl.store(q_ptr + offs, yq.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_looped(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, q_ptr, q_scale, q_rscale, q_zero, n, eps,
                      RMS: tl.constexpr, HAS_B: tl.constexpr, STATS: tl.constexpr, XD: tl.constexpr,
                      PD: tl.constexpr, QD: tl.constexpr, STORE_Y: tl.constexpr, YD: tl.constexpr,
                      QUANT: tl.constexpr, SD: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr,
                      BLOCK: tl.constexpr, PDL: tl.constexpr):
    km.pdl_sync(PDL)
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    cols = tl.arange(0, BLOCK)
    if RMS:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            x = tl.load(x_ptr + base + start + cols, mask=start + cols < n, other=0.0).to(tl.float32)
            acc += x * x
        scale = tl.sqrt_rn(tl.sum(acc, axis=0) / n + eps)
    else:
        mean, m2, _ = _welford(x_ptr + base, 0, n, BLOCK)
        scale = tl.div_rn(1.0, tl.sqrt_rn(m2 / n + eps))
        if STATS:
            tl.store(mean_ptr + row, mean)
            tl.store(rstd_ptr + row, scale)
    for start in range(0, n, BLOCK):
        c = start + cols
        mask = c < n
        x = tl.load(x_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        b = w
        if HAS_B:
            b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            v = tl.div_rn(x, scale)
        else:
            v = (x - mean) * scale
        y = _affine(v, w, b, RMS, HAS_B, XD, PD, QD)
        if STORE_Y:
            tl.store(y_ptr + base + c, y.to(y_ptr.dtype.element_ty), mask=mask)
        if QUANT > 0:
            yq = quantize_tile(y, q_scale, q_rscale, q_zero, YD, QUANT, SD, QLO, QHI)
            tl.store(q_ptr + base + c, yq.to(q_ptr.dtype.element_ty), mask=mask)


QUANT_RANGES = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.float8_e4m3fn: (-448, 448)}
"""The 8-bit types a norm writes itself (`Quantize.out`) and their ranges."""


@dataclass(frozen=True)
class Quantize:
    """QuantizeLinear of the norm's result, computed by the norm kernel: Y / scale in `precision`, rounded to
    `out` (int8/uint8: + zero and clamped; float8 E4M3: saturated). `keep_y`: Y is written too."""

    scale: float
    zero: float
    out: torch.dtype
    precision: torch.dtype
    keep_y: bool
    reciprocal: float
    """1 / scale in float32, formed once (`QuantizedOutput.reciprocal`): what `km.quotient` corrects with."""

    @staticmethod
    def of(view: QuantizedOutput) -> Quantize:
        """What a "quantizing" node's QuantizeLinear asks of the kernel storing its op's result."""
        return Quantize(view.scale, view.zero, view.quantize.outputs[0].dtype.torch, view.precision, view.keep_y,
                        view.reciprocal)


def quantize_flags(quant: Quantize | None, y_dtype: torch.dtype) -> dict[str, Any]:
    """The constexpr arguments of `quantize_tile` (QUANT 0: no quantized output)."""
    lo, hi = QUANT_RANGES[quant.out] if quant is not None else (0, 0)
    return dict(YD=TL[y_dtype], QUANT=0 if quant is None else 2 if quant.out == torch.float8_e4m3fn else 1,
                SD=TL[quant.precision if quant is not None else torch.float32], QLO=float(lo), QHI=float(hi))


def layernorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, n: int, eps: float, rms: bool, stats: bool,
              config: dict[str, Any], quant: Quantize | None = None, residual: torch.Tensor | None = None,
              sum_out: torch.Tensor | None = None) \
        -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """LayerNormalization (or RMSNormalization) over the trailing `n` elements of non-empty x; `w` and `b` hold
    exactly `n` elements. Returns Y (None when `quant` drops it), per-row Mean and InvStdDev (float32, flat) when
    `stats`, and the quantized Y when `quant` is given.

    With `residual` (x's shape and dtype) the norm is of x + residual, rounded to x's dtype (what an Add makes),
    written to `sum_out` (contiguous, x's shape and dtype) when given. Rows streamed in chunks (longer than the
    config's `max_row`) add with torch first."""
    p = plan(n, config)
    if residual is not None and p.looped:
        s = torch.add(x, residual, out=sum_out) if sum_out is not None else x + residual
        return layernorm(s, w, b, n, eps, rms, stats, config, quant)
    x, w = x.contiguous(), w.contiguous()
    r = x if residual is None else residual.contiguous()
    res = 0 if residual is None else 1 if sum_out is None else 2
    b = None if b is None else b.contiguous()
    rows = x.numel() // n
    xd, pd = x.dtype, promote(x.dtype, w.dtype)
    qd = pd if b is None else promote(pd, b.dtype)
    yd = w.dtype if rms else xd
    keep_y = quant is None or quant.keep_y
    q = None if quant is None else torch.empty(x.shape, dtype=quant.out, device=x.device)
    y = torch.empty(x.shape if keep_y else (1,), dtype=yd, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device) if stats else y
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device) if stats else y
    flags = dict(RMS=rms, HAS_B=b is not None, STATS=stats, XD=TL[xd], PD=TL[w.dtype if rms else pd], QD=TL[qd],
                 STORE_Y=keep_y, **quantize_flags(quant, yd))
    scalars = (y if q is None else q, *((1.0, 1.0, 0.0) if quant is None else (quant.scale, quant.reciprocal,
                                                                               quant.zero)))
    bias = w if b is None else b
    if p.looped:
        _layernorm_looped[(rows,)](x, w, bias, y, mean, rstd, *scalars, n, eps, **flags, BLOCK=p.block,
                                   num_warps=p.num_warps, **_options())
    else:
        _layernorm_rows[grid_rows(rows, p)](x, r, r if sum_out is None else sum_out, w, bias, y, mean, rstd,
                                            *scalars, rows, n, eps, RES=res, **flags, ROWS=p.rows, BLOCK=p.block,
                                            num_warps=p.num_warps, **_options())
    return (y if keep_y else None), (mean if stats else None), (rstd if stats else None), q


# --- group norm / instance norm ------------------------------------------------------------------------------


@triton.jit
def _group_affine(d, std, rows, idx, w_ptr, b_ptr, mask, S, G, CG, RD: tl.constexpr):
    """(d / std) * scale[c] + bias[c] for in-group element indices idx of group rows (channel c = g * CG + idx // S),
    rounding each step to RD as the reference does (GroupNormalization: the input dtype; Instance: none)."""
    ch = (rows % G) * CG + idx // S
    w = _rd(tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32), RD)
    b = _rd(tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32), RD)
    return _rd(_rd(_rd(tl.div_rn(d, std), RD) * w, RD) + b, RD)


@triton.jit
def _groupnorm_rows(x_ptr, w_ptr, b_ptr, y_ptr, n_rows, L, S, G, CG, eps, RD: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK: tl.constexpr, PDL: tl.constexpr):
    km.pdl_sync(PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < L)[None, :]
    offs = rows[:, None] * L + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / L
    d = tl.where(mask, x - mean[:, None], 0.0)
    std = tl.sqrt_rn(tl.sum(d * d, axis=1) / L + eps)
    y = _group_affine(d, std[:, None], rows[:, None], cols[None, :], w_ptr, b_ptr, mask, S, G, CG, RD)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _groupnorm_partial(x_ptr, mean_ptr, m2_ptr, cnt_ptr, L, CHUNK, SPLIT, BLOCK: tl.constexpr, PDL: tl.constexpr):
    km.pdl_sync(PDL)
    pid = tl.program_id(0)
    row = (pid // SPLIT).to(tl.int64)
    lo = (pid % SPLIT) * CHUNK
    mean, m2, cnt = _welford(x_ptr + row * L, lo, tl.minimum(lo + CHUNK, L), BLOCK)
    tl.store(mean_ptr + pid, mean)
    tl.store(m2_ptr + pid, m2)
    tl.store(cnt_ptr + pid, cnt)


@triton.jit
def _groupnorm_apply(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, m2_ptr, cnt_ptr, L, S, G, CG, CHUNK, SPLIT, eps,
                     RD: tl.constexpr, SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    km.pdl_sync(PDL)
    pid = tl.program_id(0)
    row = (pid // SPLIT).to(tl.int64)
    parts = tl.arange(0, SPLIT_P2)
    pmask = parts < SPLIT
    first = row * SPLIT
    mean, m2, _ = tl.reduce((tl.load(mean_ptr + first + parts, mask=pmask, other=0.0),
                             tl.load(m2_ptr + first + parts, mask=pmask, other=0.0),
                             tl.load(cnt_ptr + first + parts, mask=pmask, other=0.0)), 0, _welford_combine)
    std = tl.sqrt_rn(m2 / L + eps)
    lo = (pid % SPLIT) * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    cols = tl.arange(0, BLOCK)
    for start in range(lo, hi, BLOCK):
        idx = start + cols
        mask = idx < hi
        x = tl.load(x_ptr + row * L + idx, mask=mask, other=0.0).to(tl.float32)
        y = _group_affine(x - mean, std, row, idx, w_ptr, b_ptr, mask, S, G, CG, RD)
        tl.store(y_ptr + row * L + idx, y.to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _programs_wanted(x: torch.Tensor) -> int:
    # why: enough programs to fill every SM a few times over; the interpreter (CPU) has no SMs to fill
    return 4 * _sm_count(x.device.index or 0) if x.is_cuda else 4


def groupnorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int, eps: float, round_to: torch.dtype,
              config: dict[str, Any]) -> torch.Tensor:
    """Group normalization of non-empty x [N, C, *spatial] (C divisible by `groups`); per-channel w and b.
    Intermediates round to `round_to` (float32: not at all)."""
    x, w, b = x.contiguous(), w.contiguous(), b.contiguous()
    n_rows = x.shape[0] * groups
    L = x.numel() // n_rows
    S = L * groups // x.shape[1]
    y = torch.empty_like(x)
    p = plan(L, config)
    if p.looped:
        _groupnorm_split(x, w, b, y, n_rows, L, S, groups, eps, TL[round_to], config)
    else:
        _groupnorm_rows[grid_rows(n_rows, p)](x, w, b, y, n_rows, L, S, groups, L // S, eps, RD=TL[round_to],
                                              ROWS=p.rows, BLOCK=p.block, num_warps=p.num_warps, **_options())
    return y


def _groupnorm_split(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor, n_rows: int, L: int, S: int,
                     groups: int, eps: float, rd: Any, config: dict[str, Any]) -> None:
    """Groups too large for registers: partial Welford statistics of chunks, then each chunk normalized with its
    group's merged statistics."""
    # why: a split group gets its parallelism from more programs, so each streams tile-sized chunks (fewer warps
    # than one long row would want)
    block = next_pow2(config["tile"])
    nw = warps(block, config["per_thread"])
    split, chunk = _split(L, n_rows, block, _programs_wanted(x))
    parts = [torch.empty(n_rows * split, dtype=torch.float32, device=x.device) for _ in range(3)]
    grid = (n_rows * split,)
    _groupnorm_partial[grid](x, *parts, L, chunk, split, BLOCK=block, num_warps=nw, **_options())
    _groupnorm_apply[grid](x, w, b, y, *parts, L, S, groups, L // S, chunk, split, eps, RD=rd,
                           SPLIT_P2=next_pow2(split), BLOCK=block, num_warps=nw, **_options())


def _split(L: int, n_rows: int, block: int, wanted: int) -> tuple[int, int]:
    """How many programs share one group (split) and how many elements each takes (chunk, a multiple of the
    block): enough programs overall to fill the GPU, never a chunk below one block."""
    blocks = (L + block - 1) // block
    split = max(1, min(blocks, (wanted + n_rows - 1) // n_rows))
    chunk = (blocks + split - 1) // split * block
    return (L + chunk - 1) // chunk, chunk
