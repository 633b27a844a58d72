"""Triton helpers the generated pointwise kernels call: functions triton.language lacks, built from its core math
(exp, log, sqrt, floor, ...) so that one source runs on the GPU and in the CPU interpreter alike. `round_even`
alone has two bodies: one instruction on the GPU, the same rounding from core math under the interpreter.

Imported only by generated kernel modules (it imports triton). Every helper takes and returns float32 (or
float64 where noted) blocks; the formulas avoid cancellation near zero and overflow at large arguments.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Under Triton's CPU interpreter (set before triton is imported), which runs no libdevice function."""
if not INTERPRETED:
    from triton.language.extra import libdevice
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_sync(PDL: tl.constexpr):
    """A hand-written kernel's first statement (`kiln.kernels.pdl`): with PDL, wait for the kernel before it, then
    let the next one launch; nothing otherwise (PDL is a constexpr: no instruction is compiled)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


INF = tl.constexpr(float("inf"))
LN2 = tl.constexpr(0.6931471805599453)
BIG = tl.constexpr(4503599627370496.0)  # 2**52: every float32/float64 at least this large is an integer


@triton.jit
def expm1(x):
    # why: exp(x) - 1 loses every digit near 0; a Taylor polynomial covers |x| < 1/4 to float32 precision
    p = x * (1.0 + x * (0.5 + x * (0.16666666666666666 + x * (0.041666666666666664 + x * (
        0.008333333333333333 + x * 0.001388888888888889)))))
    return tl.where(tl.abs(x) < 0.25, p, tl.exp(x) - 1.0)


@triton.jit
def log1p(u):
    # why: log(1 + u) loses the digits of small u; 2 atanh(s), s = u / (2 + u), converges fast for |u| < 1/4
    s = u / (2.0 + u)
    s2 = s * s
    p = 2.0 * s * (1.0 + s2 * (0.3333333333333333 + s2 * (0.2 + s2 * (0.14285714285714285 + s2 * 0.1111111111111111))))
    return tl.where(tl.abs(u) < 0.25, p, tl.log(1.0 + u))


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def gelu_tanh(x):
    # why: 0.5 x (1 + tanh(u)) = x sigmoid(2u): no cancellation where tanh(u) is near -1, and one exp
    u = 1.5957691216057308 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-u))


@triton.jit
def mish(x):
    # why: tanh(softplus(x)) = n / (n + 2) with n = e^x (e^x + 2): one exp, no cancellation for negative x
    e = tl.exp(tl.where(x < 20.0, x, 20.0))
    n = e * (e + 2.0)
    return tl.where(x > 20.0, x, x * n / (n + 2.0))


@triton.jit
def tanh(x):
    a = tl.abs(x)
    e = expm1(-2.0 * a)
    t = -e / (e + 2.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def sinh(x):
    a = tl.abs(x)
    e = expm1(a)
    s = tl.where(a > 20.0, tl.exp(a - LN2), 0.5 * (e + e / (e + 1.0)))
    return tl.where(x < 0, -s, s)


@triton.jit
def cosh(x):
    a = tl.abs(x)
    e = tl.exp(a)
    return tl.where(a > 20.0, tl.exp(a - LN2), 0.5 * (e + 1.0 / e))


@triton.jit
def asinh(x):
    a = tl.abs(x)
    r = tl.where(a > 1e18, tl.log(a) + LN2, log1p(a + a * a / (1.0 + tl.sqrt(1.0 + a * a))))
    return tl.where(x < 0, -r, r)


@triton.jit
def acosh(x):
    d = x - 1.0
    return tl.where(x > 1e18, tl.log(x) + LN2, log1p(d + tl.sqrt(d * (x + 1.0))))


@triton.jit
def atanh(x):
    a = tl.abs(x)
    r = 0.5 * log1p(2.0 * a / (1.0 - a))
    return tl.where(x < 0, -r, r)


@triton.jit
def atan(x):
    # why: Cephes' atanf: reduce |x| to [0, tan(pi/8)] with atan(x) = pi/4 + atan((x-1)/(x+1)) or
    # pi/2 - atan(1/x), then a degree-9 odd polynomial (relative error ~1e-7)
    a = tl.abs(x)
    big = a > 2.414213562373095
    mid = a > 0.41421356237309503
    y0 = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    t = tl.where(big, -1.0 / a, tl.where(mid, (a - 1.0) / (a + 1.0), a))
    z = t * t
    p = (((0.0805374449538 * z - 0.138776856032) * z + 0.199777106478) * z - 0.333329491539) * z * t + t
    r = y0 + p
    return tl.where(x < 0, -r, r)


GELU_TAIL = tl.constexpr(5.9)
"""Past |x| = 5.9, Phi(-|x|) < 1.9e-9: gelu(x) is x above and 0 below, for float16 and as float32 sums give it."""


@triton.jit
def gelu_narrow(x):
    """The erf GELU, x * Phi(x), for layers whose output is float16 or bfloat16 - half the instructions of
    0.5 * x * (1 + erf(x / sqrt(2))) on the GPU (libdevice's erf picks its polynomial's coefficients per value).
    Phi(-u) = 2**q(u), u = |x|, with q a degree-10 polynomial (least squares, float32 coefficients) of
    log2(erfc(u / sqrt(2)) / 2) on [0, 5.9]; Phi(x) = 1 - Phi(-x) for x > 0. Measured against float64
    (`tests/kernels/pointwise/gelu_cases.py`, interpreter and H100): relative error at most 2.5e-7 for x > 0 and
    3.6e-6 for x < 0 down to -5.9 (where the erf formula loses every digit to 1 + erf(z) cancelling: it is 0 below
    about -5.4); every float16 input gives the correctly rounded float16 GELU (the erf formula misses 327-333 of
    63,488). Infinities and NaN as the formula gives them."""
    u = tl.abs(x)
    q = -1.8798017364929365e-08
    q = q * u + 5.984084054944105e-07
    q = q * u + -8.14249233371811e-06
    q = q * u + 5.983365554129705e-05
    q = q * u + -0.00022200914099812508
    q = q * u + -0.00011996008106507361
    q = q * u + 0.007093079853802919
    q = q * u + -0.05253891274333
    q = q * u + -0.4591895043849945
    q = q * u + -1.1511077880859375
    q = q * u + -0.9999999403953552
    tail = tl.exp2(tl.where(u > GELU_TAIL, -INF, q))
    return x * tl.where(x > 0, 1.0 - tail, tail)


@triton.jit
def asin(x):
    return atan(x / tl.sqrt((1.0 - x) * (1.0 + x)))


@triton.jit
def acos(x):
    return 2.0 * atan(tl.sqrt((1.0 - x) / (1.0 + x)))


if INTERPRETED:
    @triton.jit
    def round_even(x):
        # why: x - floor(x) is exact, so ties are seen exactly; beyond 2**52 (and at inf/NaN) x is its own rounding
        t = tl.floor(x)
        d = x - t
        odd = t - 2.0 * tl.floor(0.5 * t)
        r = tl.where(d > 0.5, t + 1.0, tl.where(d < 0.5, t, t + odd))
        return tl.where(tl.abs(x) < BIG, r, x)
else:
    @triton.jit
    def round_even(x):
        # why: one instruction (cvt.rni) where the formula above takes a dozen per value (8-bit quantization
        # rounds without it: `round_to_8bit`)
        return libdevice.rint(x)


if INTERPRETED:
    @triton.jit
    def quotient(y, s, r):
        # why: the interpreter's fma is a rounded product then a rounded sum, so the residual below would not be
        # exact there; numpy's float32 division is the IEEE quotient itself
        return tl.div_rn(y, tl.zeros_like(y) + s)
else:
    @triton.jit
    def quotient(y, s, r):
        """y / s in float32, rounded as IEEE division rounds it, given r = 1/s rounded to nearest (`tl.div_rn(1.0,
        s)` once per program, or formed on the host): the product y * r (off by an ulp in a quarter of the cases),
        corrected once by its exact FMA residual (Markstein's step). Why: `tl.div_rn` per value takes a dozen
        instructions and a slow-path branch and made a LayerNorm that quantizes its output 1.6x slower than with
        a plain product (H100, BERT-base bs128: 38.5 vs 24.1 us), while Triton's `/` is `div.full.f32` (up to 2
        ulps off). Checked in exact float64 emulation for every pair of positive float16 y and normal s (975
        million) and 100 million random float32 pairs (2026-11-27, a one-off run; `tests/kernels/pointwise/
        test_quotient.py` keeps a subset, and the GPU test compares the kernel with torch's division): no
        difference. Past the normal float32 range (a quotient below 2**-126, whose 8-bit code is 0, or
        overflowing) the residual may be inexact: within an ulp there. A zero, infinite or NaN product is
        returned as is (its residual is 0, infinite or NaN; -0 keeps its sign)."""
        q = y * r
        e = tl.fma(-q, s, y)
        return tl.where((tl.abs(e) < INF) & (e != 0.0), tl.fma(e, r, q), q)


ROUNDER = tl.constexpr(12582912.0)
"""1.5 * 2**23: a float32 sum with it lies in [2**23, 2**24), where the spacing is 1, for any addend below 2**22."""


@triton.jit
def round_to_8bit(q, lo, hi, zero):
    """QuantizeLinear's integer step: round_half_even(q) + zero saturated to [lo, hi] (an 8-bit type's range; the
    bounds and the zero point integer-valued floats), as an int32 whose low byte is the code - store it to int8 or
    uint8. Clamped to [lo - zero, hi - zero] first (clamping commutes with rounding to integers), |q| < 2**9, so
    adding ROUNDER rounds it half to even into the sum's low mantissa bits, and adding the zero point there is exact.
    Why: two float adds and a clamp, where rint and the float-to-integer conversion run on the quarter-rate unit that
    bounds the requantizing epilogues of int8 layers. Without a zero point pass -0.0 (x + -0.0 folds away). NaN
    gives lo, as rint and the clamp did."""
    c = tl.minimum(tl.maximum(q, lo - zero), hi - zero) + ROUNDER
    return (c + zero).to(tl.int32, bitcast=True)


@triton.jit
def power(x, y, whole, odd):
    """x ** y (IEEE pow special cases); `whole`: y is an integer, `odd`: y is an odd integer."""
    ax = tl.abs(x)
    r = tl.exp2(y * tl.log2(ax))
    neg = (x < 0) | ((x == 0) & (1.0 / x < 0))
    r = tl.where(neg & odd, -r, r)
    r = tl.where((x < 0) & (whole == 0) & (ax != INF), INF * 0.0, r)  # why: NaN; a NaN global fails Triton's check
    r = tl.where((ax == 1.0) & (tl.abs(y) == INF), 1.0, r)
    return tl.where((y == 0) | (x == 1.0), 1.0, r)


@triton.jit
def float_whole(y):
    return tl.floor(y) == y


@triton.jit
def float_odd(y):
    return (tl.floor(y) == y) & (tl.floor(y * 0.5) * 2.0 != y)


@triton.jit
def fmod64(a, b):
    """C fmod on float64 blocks holding float16 values (exact there: the quotient needs at most 42 bits)."""
    q = a / b
    q = tl.where(q < 0, tl.ceil(q), tl.floor(q))
    r = a - q * b
    return tl.where((tl.abs(b) == INF) & (tl.abs(a) != INF), a, r)


@triton.jit
def floor_mod64(a, b):
    """a mod b with the divisor's sign (ONNX Mod, fmod=0); zeros take b's sign."""
    r = fmod64(a, b)
    r = tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)
    return tl.where(r == 0, tl.where(b < 0, -0.0, 0.0), r)
