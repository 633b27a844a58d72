"""Op table entries: elementwise math, comparisons, logic, bitwise ops and activations.

Elementwise ops broadcast numpy-style; their output shape comes from `broadcast_shapes`. Each op follows the
newest ONNX version of its semantics (the ONNX handlers convert older versions) and checks its input dtypes.

torch on CPU lacks most kernels for uint16/uint32/uint64, so the references compute those in a type that holds
every value (uint16 in int32, uint32 in int64), reinterpret the bits where the result does not depend on
signedness (uint64 addition as int64), order uint64 values by flipping their top bit, and divide uint64 with
numpy. float16 and bfloat16 transcendental functions are computed in float32 and rounded once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kiln.ir.dtype import DType
from kiln.ir.graph import TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, broadcast_shapes, register, same_as

Fn = Callable[..., torch.Tensor]
D = DType

FLOATS = frozenset({D.FLOAT16, D.BFLOAT16, D.FLOAT32, D.FLOAT64})
SIGNED_INTS = frozenset({D.INT8, D.INT16, D.INT32, D.INT64})
UNSIGNED_INTS = frozenset({D.UINT8, D.UINT16, D.UINT32, D.UINT64})
INTS = SIGNED_INTS | UNSIGNED_INTS
NUMERIC = FLOATS | INTS
FLOAT8 = frozenset({D.FLOAT8_E4M3FN, D.FLOAT8_E4M3FNUZ, D.FLOAT8_E5M2, D.FLOAT8_E5M2FNUZ})
BOOL = frozenset({D.BOOL})


# --- inference -----------------------------------------------------------------------------------------


def _names(dtypes: Iterable[DType]) -> str:
    return ", ".join(sorted(str(d) for d in dtypes))


def check_dtypes(ctx: InferCtx, allowed: frozenset[DType] | None, inputs: Sequence[int], *,
                 same: bool = True) -> DType:
    """The dtype of the first of `inputs`; raises when one is not `allowed` or (`same`) when they differ."""
    present = [i for i in inputs if ctx.has(i)]
    dtypes = [ctx.dtype(i) for i in present]
    for i, dt in zip(present, dtypes):
        if allowed is not None and dt not in allowed:
            raise ctx.error(f"input {i} has dtype {dt}; {ctx.node.op} takes {_names(allowed)}")
    if same and len(set(dtypes)) > 1:
        raise ctx.error(f"inputs must have one dtype, got {', '.join(str(d) for d in dtypes)}")
    return dtypes[0]


InferFn = Callable[[InferCtx], list[TensorType]]


def _unary_infer(allowed: frozenset[DType] | None, out: DType | None) -> InferFn:
    def infer(ctx: InferCtx) -> list[TensorType]:
        dt = check_dtypes(ctx, allowed, [0])
        return [TensorType(out or dt, ctx.shape(0))]

    return infer


def _nary_infer(allowed: frozenset[DType] | None, out: DType | None) -> InferFn:
    def infer(ctx: InferCtx) -> list[TensorType]:
        dt = check_dtypes(ctx, allowed, range(ctx.n_inputs))
        shape = broadcast_shapes(ctx, *(ctx.shape(i) for i in range(ctx.n_inputs)))
        return [TensorType(out or dt, shape)]

    return infer


# --- registration helpers ------------------------------------------------------------------------------


def unary(name: str, fn: Fn, *, dtypes: frozenset[DType] | None = FLOATS, out_dtype: DType | None = None,
          attrs: dict[str, Attr] | None = None, doc: str = "") -> None:
    """An op Y = fn(X, **attrs); Y has X's shape and dtype unless `out_dtype` is given."""
    register(name, inputs=["X"], outputs=["Y"], attrs=attrs, infer=_unary_infer(dtypes, out_dtype),
             ref=lambda c, xs: [fn(xs[0], **c.attrs)], doc=doc)


def binary(name: str, fn: Fn, *, dtypes: frozenset[DType] | None = NUMERIC, out_dtype: DType | None = None,
           attrs: dict[str, Attr] | None = None, doc: str = "") -> None:
    """An op C = fn(A, B, **attrs), broadcasting; A and B share a dtype, which C has unless `out_dtype`."""
    register(name, inputs=["A", "B"], outputs=["C"], attrs=attrs, infer=_nary_infer(dtypes, out_dtype),
             ref=lambda c, xs: [fn(xs[0], xs[1], **c.attrs)], doc=doc)


def variadic(name: str, fn: Fn, *, dtypes: frozenset[DType], doc: str = "") -> None:
    """An op over one or more broadcast inputs of one dtype: fn(list of tensors)."""
    register(name, inputs=["data_0+"], outputs=["result"], infer=_nary_infer(dtypes, None),
             ref=lambda c, xs: [fn(xs)], doc=doc)


# --- dtype adaptation for torch's missing CPU kernels ----------------------------------------------------

_SIGNED_VIEW = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_WIDER = {torch.uint16: torch.int32, torch.uint32: torch.int64}
_TOP_BIT = -(2**63)
_HALF = (torch.float16, torch.bfloat16)


def _signed_view(x: torch.Tensor) -> torch.Tensor:
    view = _SIGNED_VIEW.get(x.dtype)
    return x if view is None else x.view(view)


def sign_agnostic(fn: Fn) -> Fn:
    """fn on same-width signed views: right for ops whose result bits do not depend on signedness."""

    def run(*xs: torch.Tensor) -> torch.Tensor:
        view = _SIGNED_VIEW.get(xs[0].dtype)
        if view is None:
            return fn(*xs)
        return fn(*(x.view(view) for x in xs)).view(xs[0].dtype)

    return run


def ordered(x: torch.Tensor) -> torch.Tensor:
    """A signed tensor ordered like x (unsigned types torch cannot compare: widened, or top bit flipped)."""
    if x.dtype in _WIDER:
        return x.to(_WIDER[x.dtype])
    if x.dtype == torch.uint64:
        return x.view(torch.int64) ^ _TOP_BIT
    return x


def unordered(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `ordered`."""
    if dtype in _WIDER:
        return y.to(dtype)
    if dtype == torch.uint64:
        return (y ^ _TOP_BIT).view(torch.uint64)
    return y


def in_float32(fn: Fn) -> Fn:
    """fn computed in float32 for float16/bfloat16 inputs, rounded once to the input's dtype."""

    def run(x: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        if x.dtype in _HALF:
            args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
            return fn(x.float(), *args, **kw).to(x.dtype)
        return fn(x, *args, **kw)

    return run


def _u64_divmod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned 64-bit quotient and remainder (b != 0), in int64 arithmetic: torch has no uint64 division."""
    a, b = torch.broadcast_tensors(a.view(torch.int64), b.view(torch.int64))
    big = b < 0  # b >= 2**63: the quotient is 1 where a >= b, else 0
    ge = (a ^ _TOP_BIT) >= (b ^ _TOP_BIT)  # a >= b, unsigned
    d = torch.where(big, 1, b)
    # b < 2**63: q = 2 * ((a >> 1) // b) leaves a remainder r in [0, 2b), one correction step away.
    q = torch.div((a >> 1) & (2**63 - 1), d, rounding_mode="trunc") << 1
    r = a - q * d  # wraps to the right bits: r < 2b < 2**64
    step = (r ^ _TOP_BIT) >= (d ^ _TOP_BIT)
    q, r = q + step, torch.where(step, r - d, r)
    q = torch.where(big, ge.to(torch.int64), q)
    r = torch.where(big, torch.where(ge, a - b, a), r)
    return q.view(torch.uint64), r.view(torch.uint64)


def _no_zero_divisor(b: torch.Tensor) -> None:
    if bool((_signed_view(b) == 0).any()):
        raise ZeroDivisionError("integer division by zero")


# --- identity and arithmetic -----------------------------------------------------------------------------


def _identity(c: RefCtx, xs: list[Any]) -> list[Any]:
    return [xs[0]]


register("Identity", inputs=["input"], outputs=["output"], infer=same_as(0), ref=_identity,
         doc="Returns its input (tensors, sequences and optionals alike).")

binary("Add", sign_agnostic(torch.add))
binary("Sub", sign_agnostic(torch.sub))
binary("Mul", sign_agnostic(torch.mul))


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point():
        return a / b
    _no_zero_divisor(b)
    if a.dtype == torch.uint64:
        return _u64_divmod(a, b)[0]
    return unordered(torch.div(ordered(a), ordered(b), rounding_mode="trunc"), a.dtype)


binary("Div", _div, doc="Integer division truncates toward zero; an integer divisor of 0 is an error.")


def _float_mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - floor(a/b)*b with the sign of b, per ONNX (zero results carry b's sign; x % ±inf is x or b)."""
    r = torch.fmod(a, b)
    fix = (r != 0) & ((r < 0) != (b < 0))
    r = torch.where(fix, r + b, r)
    return torch.where(r == 0, torch.copysign(r, b), r)


def _mod(a: torch.Tensor, b: torch.Tensor, fmod: int) -> torch.Tensor:
    if a.is_floating_point():
        return in_float32(torch.fmod if fmod else _float_mod)(a, b)
    _no_zero_divisor(b)
    if a.dtype == torch.uint64:
        return _u64_divmod(a, b)[1]
    fn = torch.fmod if fmod else torch.remainder
    return unordered(fn(ordered(a), ordered(b)), a.dtype)


binary("Mod", _mod, attrs={"fmod": Attr(AttrKind.INT, 0, choices=(0, 1))},
       doc="fmod=0: floor modulo, the divisor's sign (Python's %); fmod=1: C fmod, the dividend's sign.")

POW_BASE = FLOATS | frozenset({D.INT32, D.INT64})


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point():
        if b.dtype == a.dtype:
            return in_float32(torch.pow)(a, b)
        return torch.pow(a.double(), b.double()).to(a.dtype)
    if b.is_floating_point():
        return torch.pow(a.double(), b.double()).to(a.dtype)
    e = b.to(torch.int64)
    whole = torch.pow(a.to(torch.int64), e.clamp_min(0))
    negative = torch.pow(a.double(), e.double()).to(torch.int64)  # x^-n truncates toward zero
    return torch.where(e < 0, negative, whole).to(a.dtype)


def _pow_infer(ctx: InferCtx) -> list[TensorType]:
    dt = check_dtypes(ctx, POW_BASE, [0])
    check_dtypes(ctx, NUMERIC, [1])
    return [TensorType(dt, broadcast_shapes(ctx, ctx.shape(0), ctx.shape(1)))]


register("Pow", inputs=["X", "Y"], outputs=["Z"], infer=_pow_infer, ref=lambda c, xs: [_pow(xs[0], xs[1])],
         doc="X ** Y in X's dtype; the exponent may have any numeric dtype.")


def _abs(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.uint8, *_SIGNED_VIEW) else torch.abs(x)


def _sign(x: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point():
        return torch.where(torch.isnan(x), x, torch.sign(x))
    if not x.dtype.is_signed:
        return (_signed_view(x) != 0).to(x.dtype)
    return torch.sign(x)


unary("Abs", _abs, dtypes=NUMERIC)
unary("Neg", torch.neg, dtypes=FLOATS | SIGNED_INTS)
unary("Sign", _sign, dtypes=NUMERIC, doc="-1, 0 or 1 (NaN stays NaN).")
unary("Reciprocal", torch.reciprocal)
unary("Ceil", torch.ceil)
unary("Floor", torch.floor)
unary("Round", torch.round, doc="Halves round to even.")
unary("Sqrt", in_float32(torch.sqrt))
unary("Exp", in_float32(torch.exp))
unary("Log", in_float32(torch.log))


def _erf(x: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point():
        return in_float32(torch.erf)(x)
    return torch.erf(x.float()).to(x.dtype)  # opset 9 integers: float32 erf truncated, as ONNX's reference


unary("Erf", _erf, dtypes=NUMERIC)
for _name, _fn in [("Sin", torch.sin), ("Cos", torch.cos), ("Tan", torch.tan), ("Asin", torch.asin),
                   ("Acos", torch.acos), ("Atan", torch.atan), ("Sinh", torch.sinh), ("Cosh", torch.cosh),
                   ("Asinh", torch.asinh), ("Acosh", torch.acosh), ("Atanh", torch.atanh),
                   ("Tanh", torch.tanh), ("Sigmoid", torch.sigmoid)]:
    unary(_name, in_float32(_fn))


# --- variadic ------------------------------------------------------------------------------------------


def _maximum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return unordered(torch.maximum(ordered(a), ordered(b)), a.dtype)


def _minimum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return unordered(torch.minimum(ordered(a), ordered(b)), a.dtype)


def _sum(xs: list[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(torch.add, xs)


def _mean(xs: list[torch.Tensor]) -> torch.Tensor:
    return in_float32(lambda s: s / len(xs))(_sum(xs))


variadic("Max", lambda xs: functools.reduce(_maximum, xs), dtypes=NUMERIC, doc="NaN propagates.")
variadic("Min", lambda xs: functools.reduce(_minimum, xs), dtypes=NUMERIC, doc="NaN propagates.")
variadic("Sum", _sum, dtypes=FLOATS)
variadic("Mean", _mean, dtypes=FLOATS)


# --- comparisons and logic --------------------------------------------------------------------------------


def _strings(x: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda s: s.decode("utf-8") if isinstance(s, bytes) else s, otypes=[object])(x)


def _equal(a: Any, b: Any) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.asarray(np.equal(_strings(a), _strings(b)), dtype=np.bool_))
    return torch.eq(_signed_view(a), _signed_view(b))


def _compare(fn: Fn) -> Fn:
    return lambda a, b: fn(ordered(a), ordered(b))


binary("Equal", _equal, dtypes=NUMERIC | BOOL | {D.STRING}, out_dtype=D.BOOL)
binary("Greater", _compare(torch.gt), out_dtype=D.BOOL)
binary("Less", _compare(torch.lt), out_dtype=D.BOOL)
binary("GreaterOrEqual", _compare(torch.ge), out_dtype=D.BOOL)
binary("LessOrEqual", _compare(torch.le), out_dtype=D.BOOL)
binary("And", torch.logical_and, dtypes=BOOL)
binary("Or", torch.logical_or, dtypes=BOOL)
binary("Xor", torch.logical_xor, dtypes=BOOL)
unary("Not", torch.logical_not, dtypes=BOOL)

IS_FLOAT = FLOATS | FLOAT8


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.element_size() == 1 else x  # float8: torch lacks most kernels


def _isinf(x: torch.Tensor, detect_negative: int, detect_positive: int) -> torch.Tensor:
    x = _as_float(x)
    return (torch.isposinf(x) & bool(detect_positive)) | (torch.isneginf(x) & bool(detect_negative))


unary("IsNaN", lambda x: torch.isnan(_as_float(x)), dtypes=IS_FLOAT, out_dtype=D.BOOL)
unary("IsInf", _isinf, dtypes=IS_FLOAT, out_dtype=D.BOOL,
      attrs={"detect_negative": Attr(AttrKind.INT, 1), "detect_positive": Attr(AttrKind.INT, 1)})


def _where_infer(ctx: InferCtx) -> list[TensorType]:
    check_dtypes(ctx, BOOL, [0])
    dt = check_dtypes(ctx, None, [1, 2])
    return [TensorType(dt, broadcast_shapes(ctx, ctx.shape(0), ctx.shape(1), ctx.shape(2)))]


def _where(c: RefCtx, xs: list[Any]) -> list[Any]:
    cond, x, y = xs
    if isinstance(x, np.ndarray):
        return [np.where(cond.cpu().numpy(), x, y).astype(object)]
    return [select(cond, x, y)]


register("Where", inputs=["condition", "X", "Y"], outputs=["output"], infer=_where_infer, ref=_where,
         doc="X where condition, else Y (any dtype, strings included); the three broadcast together.")


# --- bitwise ---------------------------------------------------------------------------------------------

binary("BitwiseAnd", sign_agnostic(torch.bitwise_and), dtypes=INTS)
binary("BitwiseOr", sign_agnostic(torch.bitwise_or), dtypes=INTS)
binary("BitwiseXor", sign_agnostic(torch.bitwise_xor), dtypes=INTS)
unary("BitwiseNot", sign_agnostic(torch.bitwise_not), dtypes=INTS)


def _bitshift(x: torch.Tensor, y: torch.Tensor, direction: str) -> torch.Tensor:
    """Shifts of `bits` or more (or negative) give the sign fill: 0, or -1 for a right shift of negative x."""
    dtype, bits = x.dtype, x.element_size() * 8
    signed = dtype.is_signed
    xi = x.view(torch.int64) if dtype == torch.uint64 else x.to(torch.int64)
    yi = y.view(torch.int64) if dtype == torch.uint64 else y.to(torch.int64)
    valid = (yi >= 0) & (yi < bits)
    s = yi.clamp(0, bits - 1)
    if direction == "LEFT":
        out = torch.where(valid, xi << s, torch.zeros_like(xi))
    elif signed:
        out = xi >> torch.where(valid, s, bits - 1)
    elif dtype == torch.uint64:
        low_bits = torch.full_like(xi, torch.iinfo(torch.int64).max) >> (s - 1).clamp_min(0)
        logical = (xi >> s) & low_bits
        out = torch.where(valid, torch.where(s == 0, xi, logical), torch.zeros_like(xi))
    else:
        out = torch.where(valid, xi >> s, torch.zeros_like(xi))
    return out.view(torch.uint64) if dtype == torch.uint64 else out.to(dtype)


binary("BitShift", _bitshift, dtypes=INTS,
       attrs={"direction": Attr(AttrKind.STRING, choices=("LEFT", "RIGHT"))},
       doc="Signed right shifts are arithmetic; bits shifted past the width are discarded.")


# --- clip and activations ---------------------------------------------------------------------------------


def _scalar_bound(ctx: InferCtx, i: int) -> None:
    shape = ctx.shape(i) if ctx.has(i) else None
    if shape is not None and (len(shape) > 1 or (shape[:1] not in ((), (1,)) and isinstance(shape[0], int))):
        raise ctx.error(f"{'min' if i == 1 else 'max'} must be a scalar, got shape {list(shape)}")


def _clip_infer(ctx: InferCtx) -> list[TensorType]:
    dt = check_dtypes(ctx, NUMERIC, [0, 1, 2])
    _scalar_bound(ctx, 1)
    _scalar_bound(ctx, 2)
    return [TensorType(dt, ctx.shape(0))]


def _bound(xs: list[Any], i: int) -> torch.Tensor | None:
    t = xs[i] if i < len(xs) else None
    if t is None:
        return None
    if t.numel() != 1:
        raise ValueError(f"{'min' if i == 1 else 'max'} must be a scalar, got shape {list(t.shape)}")
    return t.reshape(())


def _clip(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, lo, hi = xs[0], _bound(xs, 1), _bound(xs, 2)
    if lo is not None:
        x = _maximum(x, lo)
    if hi is not None:
        x = _minimum(x, hi)
    return [x]


register("Clip", inputs=["input", "min?", "max?"], outputs=["output"], infer=_clip_infer, ref=_clip,
         doc="Min(max, Max(input, min)): when min > max every value becomes max. Absent bounds do not clip.")


def _static_differ(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return any(isinstance(p, int) and isinstance(q, int) and p != q for p, q in zip(a, b))


def _prelu_infer(ctx: InferCtx) -> list[TensorType]:
    dt = check_dtypes(ctx, FLOATS | {D.INT32, D.INT64, D.UINT32, D.UINT64}, [0, 1])
    x, slope = ctx.shape(0), ctx.shape(1)
    out = broadcast_shapes(ctx, x, slope)
    if out is not None and x is not None and (len(out) != len(x) or _static_differ(out, x)):
        raise ctx.error(f"slope {list(slope or ())} does not broadcast to X {list(x)}")
    return [TensorType(dt, x)]


def _prelu(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, slope = xs
    if x.dtype in (torch.uint32, torch.uint64):
        return [x]
    return [torch.where(x < 0, x * slope, x)]


register("PRelu", inputs=["X", "slope"], outputs=["Y"], infer=_prelu_infer, ref=_prelu,
         doc="slope * X where X < 0, else X; slope broadcasts to X (one way).")


def _selu(x: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def _greater_than(x: torch.Tensor, k: int) -> torch.Tensor:
    """x > k for a Python int k, exact for every integer dtype."""
    info = torch.iinfo(x.dtype)
    if k < info.min:
        return torch.ones_like(x, dtype=torch.bool)
    if k >= info.max:
        return torch.zeros_like(x, dtype=torch.bool)
    return ordered(x) > ordered(torch.full((), k, device=x.device).to(x.dtype))


def _less_than(x: torch.Tensor, k: int) -> torch.Tensor:
    return ~_greater_than(x, k - 1)


def _trunc_add(x: torch.Tensor, c: float) -> torch.Tensor:
    """trunc(x + c) for integer x and real c, exactly (wrapping like integer addition)."""
    whole = math.floor(c)
    add = sign_agnostic(torch.add)
    out = add(x, torch.full((), whole, device=x.device).to(x.dtype).expand_as(x))
    if c > whole:  # x + whole < 0 truncates up
        out = torch.where(_less_than(x, -whole), add(out, torch.ones_like(x)), out)
    return out


_SIGNED_VIEW = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def select(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where for every dtype: older torch releases (2.11, the GPU machines') lack it for uint16/32/64, so
    those select on the same bits viewed as signed integers."""
    signed = _SIGNED_VIEW.get(a.dtype)
    if signed is None or b.dtype != a.dtype:
        return torch.where(cond, a, b)
    return torch.where(cond, a.view(signed), b.view(signed)).view(a.dtype)


def _shrink(x: torch.Tensor, bias: float, lambd: float) -> torch.Tensor:
    """Integers take the real-valued result truncated toward zero (as ONNX's reference and onnxruntime do;
    ONNX's function body would first cast lambd and bias to X's dtype)."""
    zero = torch.zeros_like(x)
    if x.is_floating_point():
        lam = torch.full((), lambd, device=x.device).to(x.dtype)
        b = torch.full((), bias, device=x.device).to(x.dtype)
        return torch.where(x < -lam, x + b, torch.where(x > lam, x - b, zero))
    small, big = _less_than(x, math.ceil(-lambd)), _greater_than(x, math.floor(lambd))
    return select(small, _trunc_add(x, bias), select(big, _trunc_add(x, -bias), zero))


def _floats(**kw: float) -> dict[str, Attr]:
    return {k: Attr(AttrKind.FLOAT, v) for k, v in kw.items()}


unary("Relu", torch.relu, dtypes=FLOATS | SIGNED_INTS)
unary("LeakyRelu", in_float32(lambda x, alpha: F.leaky_relu(x, alpha)), attrs=_floats(alpha=0.01))
unary("Elu", in_float32(lambda x, alpha: F.elu(x, alpha)), attrs=_floats(alpha=1.0))
unary("Celu", in_float32(lambda x, alpha: F.celu(x, alpha)), attrs=_floats(alpha=1.0))
unary("Selu", in_float32(_selu),
      attrs=_floats(alpha=1.67326319217681884765625, gamma=1.05070102214813232421875))
unary("ThresholdedRelu", lambda x, alpha: torch.where(x > alpha, x, torch.zeros_like(x)),
      attrs=_floats(alpha=1.0))
unary("HardSigmoid", in_float32(lambda x, alpha, beta: torch.clamp(alpha * x + beta, 0, 1)),
      attrs=_floats(alpha=0.2, beta=0.5))
unary("HardSwish", in_float32(lambda x: x * torch.clamp(x / 6 + 0.5, 0, 1)))
unary("Softplus", in_float32(lambda x: torch.logaddexp(x, torch.zeros_like(x))))
unary("Softsign", in_float32(lambda x: x / (1 + torch.abs(x))))
unary("Mish", in_float32(F.mish))
unary("Gelu", in_float32(lambda x, approximate: F.gelu(x, approximate=approximate)),
      attrs={"approximate": Attr(AttrKind.STRING, "none", choices=("none", "tanh"))})
unary("Swish", in_float32(lambda x, alpha: x * torch.sigmoid(alpha * x)), attrs=_floats(alpha=1.0))
unary("Shrink", _shrink, dtypes=NUMERIC, attrs=_floats(bias=0.0, lambd=0.5))


def _swiglu_infer(ctx: InferCtx) -> list[TensorType]:
    dt = check_dtypes(ctx, FLOATS, [0, 1])
    a, b = ctx.shape(0), ctx.shape(1)
    if a is not None and b is not None:
        if len(a) != len(b) or _static_differ(a, b):
            raise ctx.error(f"A {list(a)} and B {list(b)} must have one shape (SwiGLU does not broadcast)")
        a = tuple(q if isinstance(q, int) else p for p, q in zip(a, b))
    return [TensorType(dt, a if a is not None else b)]


def _swiglu(c: RefCtx, xs: list[Any]) -> list[Any]:
    a, b = xs
    if a.shape != b.shape:
        raise ValueError(f"A {list(a.shape)} and B {list(b.shape)} must have the same shape")
    alpha = c.attrs["alpha"]
    return [in_float32(lambda p, q: p * torch.sigmoid(alpha * p) * q)(a, b)]


register("SwiGLU", inputs=["A", "B"], outputs=["Y"], infer=_swiglu_infer, ref=_swiglu,
         attrs=_floats(alpha=1.0), doc="Swish_alpha(A) * B; A and B have one shape.")
