"""Op table entries: Cast and BitCast.

Cast converts between every pair of kiln dtypes except complex ones. Plain numeric pairs follow torch's
conversions (C semantics: integers wrap, floats round to nearest even). The narrow types that kiln stores
widened get their values here: sub-byte integers wrap to their width, float8/float4/float6 round to nearest
even (float8 saturating to the largest finite value unless `saturate=0`) exactly as ml_dtypes (ONNX's own
reference) does, float8e8m0 rounds as `round_mode` says. The rounding is integer arithmetic on the bits in
torch, so every device computes the same codes where the tensor is (no host round trip, no reliance on torch's
own float8 conversion kernels).
Strings convert through Python's parsing and numpy's shortest round-trip formatting.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register

D = DType
FLOAT8 = frozenset({D.FLOAT8_E4M3FN, D.FLOAT8_E4M3FNUZ, D.FLOAT8_E5M2, D.FLOAT8_E5M2FNUZ})
_ML_FLOATS = FLOAT8 | {D.FLOAT4_E2M1, D.FLOAT6_E2M3, D.FLOAT6_E3M2}
"""Targets rounded as ml_dtypes rounds them (ONNX's own reference rounds these the same way)."""
_NO_CAST = frozenset({D.COMPLEX64, D.COMPLEX128})


# --- inference -----------------------------------------------------------------------------------------


def _cast_infer(ctx: InferCtx) -> list[TensorType]:
    src, to = ctx.dtype(0), ctx.attrs["to"]
    for what, dt in (("input", src), ("target", to)):
        if dt in _NO_CAST:
            raise ctx.error(f"{what} dtype {dt} is not supported by Cast")
    return [TensorType(to, ctx.shape(0))]


def _bitcast_infer(ctx: InferCtx) -> list[TensorType]:
    src, to = ctx.dtype(0), ctx.attrs["to"]
    if D.STRING in (src, to):
        raise ctx.error("strings have no bit pattern to reinterpret")
    if src.bits != to.bits:
        raise ctx.error(f"cannot reinterpret {src} ({src.bits} bits) as {to} ({to.bits} bits): widths differ")
    return [TensorType(to, ctx.shape(0))]


# --- numbers -------------------------------------------------------------------------------------------


def _plain_source(x: torch.Tensor) -> torch.Tensor:
    """float8 through float32 (exact): torch lacks most conversions out of float8."""
    return x.float() if x.is_floating_point() and x.element_size() == 1 else x


def _numpy_source(x: torch.Tensor) -> np.ndarray:
    """x as a (host) numpy array that holds its values exactly (bfloat16 and float8 widen to float32)."""
    if x.dtype == torch.bfloat16 or (x.is_floating_point() and x.element_size() == 1):
        return x.float().cpu().numpy()
    return x.cpu().numpy()


@dataclass(frozen=True)
class _MiniFloat:
    """A float8/float6/float4 format: mantissa bits, exponent bias, the largest finite value, the width, the
    codes of +inf and +NaN where it has them; `uz` formats (fnuz) have one NaN (0x80) and no -0."""

    mant: int
    bias: int
    max: float
    bits: int
    inf: int | None = None
    nan: int | None = None
    uz: bool = False


_FORMATS = {
    D.FLOAT8_E4M3FN: _MiniFloat(3, 7, 448.0, 8, nan=0x7F),
    D.FLOAT8_E4M3FNUZ: _MiniFloat(3, 8, 240.0, 8, nan=0x80, uz=True),
    D.FLOAT8_E5M2: _MiniFloat(2, 15, 57344.0, 8, inf=0x7C, nan=0x7E),
    D.FLOAT8_E5M2FNUZ: _MiniFloat(2, 16, 57344.0, 8, nan=0x80, uz=True),
    D.FLOAT4_E2M1: _MiniFloat(1, 1, 6.0, 4),
    D.FLOAT6_E2M3: _MiniFloat(3, 1, 7.5, 6),
    D.FLOAT6_E3M2: _MiniFloat(2, 3, 28.0, 6),
}


def _encode(x: torch.Tensor, f: _MiniFloat, saturate: bool) -> torch.Tensor:
    """The int64 codes of x (any real dtype) rounded to nearest even in format f, as ml_dtypes rounds:
    overflow (and inf) saturates with `saturate`, else becomes inf or NaN where the format has them, and
    saturates where it has neither; NaN becomes NaN, or a zero of the opposite sign where there is none."""
    x = x.to(torch.float64)  # exact for every source value kiln converts
    neg, nan = torch.signbit(x), torch.isnan(x)
    m = x.abs()
    if saturate:
        m = m.clamp(max=f.max)
    finite = torch.isfinite(m)
    m = torch.where(finite, m, 0.0)
    # floor(log2(m)) from the float64 exponent bits, no lower than the format's smallest normal exponent;
    # the spacing of representable values there is q = 2**(e - mant), built from bits too (exact).
    e = ((m.view(torch.int64) >> 52) - 1023).clamp(min=1 - f.bias)
    q = ((e - f.mant + 1023) << 52).view(torch.float64)
    k = torch.round(m / q)  # half to even; k = 2**(mant+1) carries into the next binade, as the code does
    code = ((e + f.bias - 1) << f.mant) + k.to(torch.int64)
    over = ~finite | (k * q > f.max)
    code = torch.where(over, f.inf if f.inf is not None else f.nan if f.nan is not None else _max_code(f), code)
    sign = neg.to(torch.int64) << (f.bits - 1)
    if f.uz:  # no negative zero; the one NaN (what overflow gives too) is the sign bit alone
        sign = torch.where(code == 0, 0, sign)
    code = code | sign
    if f.nan is None:  # no NaN: ml_dtypes gives a zero of the opposite sign
        return torch.where(nan, (~neg).to(torch.int64) << (f.bits - 1), code)
    return torch.where(nan, f.nan if f.uz else f.nan | sign, code)


def _max_code(f: _MiniFloat) -> int:
    """The code of the largest finite value."""
    e = math.frexp(f.max)[1] - 1
    return ((e + f.bias) << f.mant) + int(f.max / 2.0 ** (e - f.mant)) - (1 << f.mant)


@functools.cache
def _decode_table(to: DType) -> torch.Tensor:
    """The float32 value of every code of a narrow float type (a CPU tensor; index it with the codes)."""
    codes = np.arange(1 << to.bits, dtype=np.uint8)
    with np.errstate(all="ignore"):
        return torch.from_numpy(codes.view(to.numpy).astype(np.float32))


def round_to_float(x: torch.Tensor, to: DType, saturate: bool) -> torch.Tensor:
    """x rounded to a float8/float6/float4 type, in kiln storage (a torch float8 tensor, or the float32 values
    of the narrower types), on x's device."""
    code = _encode(x, _FORMATS[to], saturate)
    if to in FLOAT8:
        return code.to(torch.uint8).view(to.torch)
    return _decode_table(to).to(x.device)[code]


def _to_ml_float(x: torch.Tensor, to: DType, saturate: int) -> torch.Tensor:
    return round_to_float(_plain_source(x), to, bool(saturate) and to in FLOAT8)


def _wrap_int(x: torch.Tensor, to: DType) -> torch.Tensor:
    """The integer value (floats truncated toward zero) wrapped to `to`'s width: int4 keeps 4 bits, signed."""
    v = _plain_source(x).to(torch.int64)
    low = v & ((1 << to.bits) - 1)
    if to.is_signed:
        half = 1 << (to.bits - 1)
        low = (low ^ half) - half
    return low.to(to.torch)


_E8M0_NAN = 0x7FC00000


def _to_e8m0(x: torch.Tensor, saturate: int, round_mode: str) -> torch.Tensor:
    """The power of two (stored in float32) `round_mode` picks for |x|, per ONNX: NaN stays NaN; zero, inf and
    values out of range saturate to the smallest/largest power, or become NaN without `saturate`."""
    bits = _plain_source(x).to(torch.float32).view(torch.int32) & 0x7FFFFFFF
    exp, frac = bits >> 23, bits & 0x7FFFFF
    code = torch.where(exp == 0, _e8m0_subnormal(frac, round_mode), exp + _e8m0_round(frac, round_mode))
    underflow = (exp == 0) & (frac < 0x400000) & (round_mode != "up" or frac == 0)  # below 2**-127
    out_of_range = (code > 0xFE) | underflow | ((exp == 0xFF) & (frac == 0))
    nan = ((exp == 0xFF) & (frac != 0)) | (out_of_range & (not saturate))
    code = code.clamp(0, 0xFE)
    out = torch.where(code == 0, torch.full_like(code, 0x400000), code << 23)  # 2**-127: a subnormal
    return torch.where(nan, torch.full_like(out, _E8M0_NAN), out).view(torch.float32)


def _e8m0_round(frac: torch.Tensor, round_mode: str) -> torch.Tensor:
    """0 or 1: whether 2**e * (1 + frac / 2**23) goes up to 2**(e+1)."""
    if round_mode == "up":
        return (frac != 0).int()
    if round_mode == "nearest":  # ties up
        return (frac >= 0x400000).int()
    return torch.zeros_like(frac)


def _e8m0_subnormal(frac: torch.Tensor, round_mode: str) -> torch.Tensor:
    """Below 2**-126 (frac * 2**-149): code 0 (2**-127) or 1 (2**-126)."""
    if round_mode == "up":
        return (frac > 0x400000).int()
    if round_mode == "nearest":
        return (frac >= 0x600000).int()
    return torch.zeros_like(frac)


# --- strings -------------------------------------------------------------------------------------------


def _format(x: torch.Tensor) -> np.ndarray:
    """Numbers as text: integers in decimal, floats in the shortest form that reads back to the same value
    of the source type (float32's for bfloat16 and narrower), 'nan', 'inf', '-inf'; bools 'True'/'False'."""
    return _numpy_source(x).astype(np.str_).astype(object)


def _parse_float(s: str) -> float:
    return float(s)  # accepts '1e-5', 'INF', '+inf', '-Infinity', 'NaN' in any case, surrounding spaces


def _parse_int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        f = float(s)
        if not math.isfinite(f):
            raise ValueError(f"string '{s}' has no integer value") from None
        return int(f)  # '100.5' -> 100


def _parse_bool(s: str) -> bool:
    low = s.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    return float(s) != 0


def _parse(a: np.ndarray, to: DType) -> tuple[torch.Tensor, DType]:
    """Strings -> the widest tensor of `to`'s kind (float64, int64/uint64 or bool) and its dtype."""
    texts = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in a.reshape(-1)]
    shape = a.shape
    if to is D.BOOL:
        return torch.tensor([_parse_bool(s) for s in texts], dtype=torch.bool).reshape(shape), D.BOOL
    if to.is_int:
        ints = [_parse_int(s) & (2**64 - 1) for s in texts]
        u = np.array(ints, dtype=np.uint64).reshape(shape)
        if to is D.UINT64:
            return torch.from_numpy(u), D.UINT64
        return torch.from_numpy(u.view(np.int64)), D.INT64
    floats = np.array([_parse_float(s) for s in texts], dtype=np.float64).reshape(shape)
    return torch.from_numpy(floats), D.FLOAT64


# --- cast ----------------------------------------------------------------------------------------------


def cast(x: Any, src: DType, to: DType, saturate: int = 1, round_mode: str = "up") -> Any:
    """x (kiln storage of dtype `src`) as dtype `to`, per ONNX Cast."""
    if to is D.STRING:
        return x if src is D.STRING else _format(x)
    if src is D.STRING:
        x, src = _parse(x, to)
    if to is src and not (saturate and to in FLOAT8):  # saturation maps a float8's own inf to its max
        return x
    if to is D.FLOAT8_E8M0:
        return _to_e8m0(x, saturate, round_mode)
    if to in _ML_FLOATS:
        return _to_ml_float(x, to, saturate)
    if to.is_narrow:
        return _wrap_int(x, to)
    return _plain_source(x).to(to.torch)


def _src_dtype(c: RefCtx) -> DType:
    v = c.node.inputs[0]
    assert v is not None
    return v.dtype


def _cast_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    a = c.attrs
    return [cast(xs[0], _src_dtype(c), a["to"], a["saturate"], a["round_mode"])]


register(
    "Cast", inputs=["input"], outputs=["output"], infer=_cast_infer, ref=_cast_ref,
    attrs={
        "to": Attr(AttrKind.DTYPE),
        "saturate": Attr(AttrKind.INT, 1, choices=(0, 1),
                         doc="float8 targets: out-of-range values (and inf) become the largest finite value"),
        "round_mode": Attr(AttrKind.STRING, "up", choices=("up", "down", "nearest"),
                           doc="float8e8m0 targets: round up, down or to the nearest power of two"),
    },
    doc="Converts to dtype `to` (every dtype but complex, strings included).",
)


# --- bitcast -------------------------------------------------------------------------------------------

_RAW = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def _bits(x: torch.Tensor, src: DType) -> torch.Tensor:
    """The raw bits: a uint8 tensor for 8 bits or fewer, else a signed integer tensor of the width."""
    if src.is_narrow and src.is_int:
        return (x.to(torch.int16) & ((1 << src.bits) - 1)).to(torch.uint8)
    if src is D.FLOAT8_E8M0:  # 2**(code - 127) in float32: the code is its exponent field (NaN: 0xFF)
        return ((x.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    if src.is_narrow:  # float4/float6 in float32: exact values -> their codes
        return _encode(x, _FORMATS[src], True).to(torch.uint8)
    return x.view(_RAW[src.bits])


def _from_bits(b: torch.Tensor, to: DType) -> torch.Tensor:
    if to is D.BOOL:
        return b != 0
    if to.is_narrow and to.is_int:
        v = b.to(torch.int16)
        if to.is_signed:
            half = 1 << (to.bits - 1)
            v = (v ^ half) - half
        return v.to(to.torch)
    if to.is_narrow:
        return _decode_table(to).to(b.device)[b.to(torch.int64)]
    return b.view(to.torch)


def _bitcast_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    src, to = _src_dtype(c), c.attrs["to"]
    if src is to:
        return [xs[0]]
    return [_from_bits(_bits(xs[0], src), to)]


register("BitCast", inputs=["input"], outputs=["output"], infer=_bitcast_infer, ref=_bitcast_ref,
         attrs={"to": Attr(AttrKind.DTYPE)},
         doc="Reinterprets the bits (little endian) as dtype `to` of the same width.")
