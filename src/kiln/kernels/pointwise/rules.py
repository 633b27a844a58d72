"""How each elementwise op becomes Triton expression text, and which nodes the generator takes.

Values live in a compute type: float16/bfloat16/float32 in float32, float64 in float64, integers and bools in their
own type (so integer arithmetic wraps as the reference's does). A float16/bfloat16 value computed in float32 is
not yet rounded to its type (`Expr.exact` is False); ops whose result jumps (comparisons, Floor, Round, Cast to an
integer...) first round such inputs, so they see exactly the values the reference sees. Continuous ops keep the
extra precision, which is the point of computing in float32.

A rule's `check` returns why a node cannot be generated (None when it can): an op missing here, a dtype the
formulas do not cover (float64 transcendentals, integer division, unsigned types wider than 8 bits), an attribute
value with other semantics. Formulas match the op table's references in kiln.ir.ops.elementwise and .cast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Value

D = DType
NARROW = frozenset({D.FLOAT16, D.BFLOAT16})
F32 = NARROW | {D.FLOAT32}
"""Floats computed in float32 (transcendental formulas are written for float32)."""
FLOATS = F32 | {D.FLOAT64}
SIGNED = frozenset({D.INT8, D.INT16, D.INT32, D.INT64})
INTS = SIGNED | {D.UINT8}
NUMERIC = FLOATS | INTS
BOOL = frozenset({D.BOOL})
SUPPORTED = NUMERIC | BOOL

_TL = {
    D.FLOAT16: "tl.float16", D.BFLOAT16: "tl.bfloat16", D.FLOAT32: "tl.float32", D.FLOAT64: "tl.float64",
    D.INT8: "tl.int8", D.INT16: "tl.int16", D.INT32: "tl.int32", D.INT64: "tl.int64", D.UINT8: "tl.uint8",
    D.BOOL: "tl.int1", D.FLOAT8_E4M3FN: "tl.float8e4nv",
}
FP8 = D.FLOAT8_E4M3FN
"""Generated only as QuantizeLinear's output (the last step of an FP8 layer's epilogue), never read."""
FP8_MAX = 448.0
_NAN_MAX = "tl.PropagateNan.ALL"


@dataclass(frozen=True)
class Expr:
    text: str
    """A variable name of the kernel body."""
    dtype: DType
    exact: bool = True
    """The compute-type value is exactly a value of `dtype` (False: float16/bfloat16 not yet rounded)."""
    value: float | int | bool | None = None
    """The value of a literal constant."""


class Builder(Protocol):
    reciprocal_quotients: bool
    """QuantizeLinear may multiply by the scale's reciprocal (formed once) instead of dividing every value: set for
    tile epilogues, whose requantized results are judged within one step of the reference's, not bit for bit (a
    product rounds differently from the quotient where that lies within a float32 ulp of a rounding boundary)."""

    def let(self, text: str, dtype: DType, exact: bool | None = None) -> Expr:
        """A new body variable holding `text`; `exact` defaults to True except for float16/bfloat16."""

    def lit(self, value: float | int | bool, dtype: DType) -> Expr:
        """A constant of `dtype` (the value already in that type)."""


Emit = Callable[[Builder, Node, list[Expr | None]], Expr]
Check = Callable[[Node], str | None]


@dataclass(frozen=True)
class Rule:
    emit: Emit
    check: Check
    data: tuple[int, ...] | None = None
    """Input positions read elementwise (None: all); others (Expand's shape) only shape the domain."""


def storage(dt: DType) -> str:
    return _TL[dt]


def compute(dt: DType) -> str:
    return "tl.float32" if dt in F32 else _TL[dt]


def rounded(x: Expr) -> str:
    """x's text, rounded to its dtype first when it is a float16/bfloat16 value computed in float32."""
    return x.text if x.exact else f"{x.text}.to({storage(x.dtype)}).to(tl.float32)"


def float_text(v: float) -> str:
    if math.isnan(v):
        return "(INF * 0.0)"  # why: a NaN global would fail Triton's check that globals have not changed
    if math.isinf(v):
        return "INF" if v > 0 else "-INF"
    return repr(float(v))


def in_dtype(v: float, dt: DType) -> float:
    """v rounded to float dtype dt (as torch does when it compares a tensor of dt with a Python number)."""
    return float(torch.tensor(v, dtype=torch.float64).to(dt.torch).double())


def via_tensor(v: float, dt: DType) -> float:
    """torch.tensor(v).to(dt): through float32 first (how Shrink's reference makes its constants)."""
    return float(torch.tensor(v).to(dt.torch).double())


# --- checks ---------------------------------------------------------------------------------------------


def _present(n: Node) -> list[Value]:
    return [v for v in n.inputs if v is not None]


def dtypes(inputs: frozenset[DType], outputs: frozenset[DType] | None = None, at: tuple[int, ...] | None = None,
           extra: Check | None = None) -> Check:
    """Every (listed) present input has a dtype in `inputs`, every output one in `outputs` (default: inputs)."""
    outs = inputs if outputs is None else outputs

    def check(n: Node) -> str | None:
        ins = _present(n) if at is None else [v for i, v in enumerate(n.inputs) if i in at and v is not None]
        for v in [*ins, *n.outputs]:
            allowed = outs if v in n.outputs else inputs
            if v.dtype not in allowed:
                return f"{n.op} on {v.dtype} is not generated"
        return extra(n) if extra is not None else None

    return check


# --- shared text ----------------------------------------------------------------------------------------


def maximum(a: str, b: str, dt: DType) -> str:
    return f"tl.maximum({a}, {b}, propagate_nan={_NAN_MAX})" if dt.is_float else f"tl.maximum({a}, {b})"


def minimum(a: str, b: str, dt: DType) -> str:
    return f"tl.minimum({a}, {b}, propagate_nan={_NAN_MAX})" if dt.is_float else f"tl.minimum({a}, {b})"


def _clamp01(t: str) -> str:
    return minimum(maximum(t, "0.0", D.FLOAT32), "1.0", D.FLOAT32)


def _softplus(x: str) -> str:
    return f"(tl.where({x} > 0, {x}, 0.0) + km.log1p(tl.exp(-tl.abs({x}))))"


def _out(n: Node) -> DType:
    return n.outputs[0].dtype


def _x(xs: list[Expr | None], i: int = 0) -> Expr:
    x = xs[i]
    assert x is not None
    return x


def _bitwise_not(text: str, dt: DType) -> str:
    return f"({text} ^ 255)" if dt is D.UINT8 else f"~{text}"


def _wrap(text: str, dt: DType) -> str:
    """Integer results cast back to their type (Triton may widen literals)."""
    return text if dt.is_float else f"({text}).to({compute(dt)})"


# --- rule makers ----------------------------------------------------------------------------------------

Template = Callable[[str, Node], str]


def floating(template: Template, *, f64: bool = False, jumps: bool = False) -> Rule:
    """A unary float op (float64 too with `f64`). `jumps`: discontinuous (Floor, Round): it reads the rounded
    input, and its result is then a value of the dtype."""

    def emit(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
        x = _x(xs)
        text = template(rounded(x) if jumps else x.text, n)
        return b.let(text, _out(n), True if jumps else None)

    return Rule(emit, dtypes(FLOATS if f64 else F32))


def _arith(op: str) -> Emit:
    def emit(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
        a, c = _x(xs, 0), _x(xs, 1)
        return b.let(_wrap(f"{a.text} {op} {c.text}", _out(n)), _out(n))

    return emit


def _compare(op: str) -> Emit:
    def emit(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
        a, c = _x(xs, 0), _x(xs, 1)
        return b.let(f"{rounded(a)} {op} {rounded(c)}", D.BOOL)

    return emit


def _logic(op: str) -> Emit:
    def emit(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
        return b.let(_wrap(f"{_x(xs, 0).text} {op} {_x(xs, 1).text}", _out(n)), _out(n))

    return emit


def _fold(pick: Callable[[str, str, DType], str], *, mean: bool = False, keeps: bool = False) -> Emit:
    def emit(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
        args = [x for x in xs if x is not None]
        dt = _out(n)
        text = args[0].text
        for x in args[1:]:
            text = pick(text, x.text, dt)
        if mean:
            text = f"({text}) / {float(len(args))}"
        exact = all(x.exact for x in args) if keeps else None
        return b.let(_wrap(text, dt) if len(args) > 1 else text, dt, exact)

    return emit


def _identity(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    return _x(xs)


# --- ops with their own logic -------------------------------------------------------------------------------


def _abs(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x = _x(xs)
    if x.dtype is D.UINT8:
        return x
    return b.let(_wrap(f"tl.abs({x.text})", x.dtype), x.dtype, x.exact)


def _neg(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x = _x(xs)
    return b.let(_wrap(f"-{x.text}", x.dtype), x.dtype, x.exact)


def _sign(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x, dt = _x(xs), _out(n)
    if dt.is_float:
        r = rounded(x)
        return b.let(f"tl.where({r} > 0, 1.0, tl.where({r} < 0, -1.0, {r}))", dt, True)
    if dt is D.UINT8:
        return b.let(f"({x.text} != 0).to(tl.uint8)", dt)
    c = compute(dt)
    return b.let(_wrap(f"({x.text} > 0).to({c}) - ({x.text} < 0).to({c})", dt), dt)


def _relu(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x, dt = _x(xs), _out(n)
    if dt.is_float:
        return b.let(f"tl.where({x.text} < 0, 0.0, {x.text})", dt, x.exact)
    return b.let(_wrap(f"tl.where({x.text} < 0, 0, {x.text})", dt), dt)


def _where(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    c, x, y = _x(xs, 0), _x(xs, 1), _x(xs, 2)
    return b.let(f"tl.where({c.text}, {x.text}, {y.text})", _out(n), x.exact and y.exact)


def _clip(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x, dt = _x(xs), _out(n)
    text, exact = x.text, x.exact
    lo, hi = (xs[i] if i < len(xs) else None for i in (1, 2))
    if lo is not None:
        text, exact = maximum(text, lo.text, dt), exact and lo.exact
    if hi is not None:
        text, exact = minimum(text, hi.text, dt), exact and hi.exact
    return b.let(text, dt, exact)


def _clip_check(n: Node) -> str | None:
    for v in n.inputs[1:]:
        if v is not None and (v.shape is None or math.prod(d if isinstance(d, int) else 2 for d in v.shape) != 1):
            return "Clip bounds must be scalars"
    return None


def _prelu(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x, s, dt = _x(xs, 0), _x(xs, 1), _out(n)
    return b.let(f"tl.where({x.text} < 0, {_wrap(f'{x.text} * {s.text}', dt)}, {x.text})", dt)


def _pow(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x, y, dt = _x(xs, 0), _x(xs, 1), _out(n)
    if y.value in (1, 2, 3):  # why: exact products for the exponents models use (x**2 in norms, x**3 in gelu)
        return b.let(" * ".join([x.text] * int(y.value)), dt)
    if y.dtype.is_float:
        r = rounded(y)
        return b.let(f"km.power({x.text}, {r}, km.float_whole({r}), km.float_odd({r}))", dt)
    return b.let(f"km.power({x.text}, {y.text}.to(tl.float32), ({y.text} & 0) == 0, ({y.text} & 1) != 0)", dt)


def _pow_check(n: Node) -> str | None:
    x, y = n.inputs[0], n.inputs[1]
    assert x is not None and y is not None
    if x.dtype not in F32:
        return f"Pow with a {x.dtype} base is not generated"
    if y.dtype not in F32 | INTS:
        return f"Pow with a {y.dtype} exponent is not generated"
    return None


def _mod(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    a, c = (f"{rounded(_x(xs, i))}.to(tl.float64)" for i in (0, 1))
    fn = "km.fmod64" if n.attrs["fmod"] else "km.floor_mod64"
    return b.let(f"{fn}({a}, {c}).to(tl.float32)", _out(n), bool(n.attrs["fmod"]))


def _cast(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x, to = _x(xs), n.attrs["to"]
    src = x.dtype
    if to is src:
        return x
    if src is D.BOOL or (src.is_int and to.is_int):
        return b.let(f"{x.text}.to({compute(to)})", to)
    if to is D.BOOL:
        return b.let(f"{rounded(x)} != 0", to)
    if src.is_int:  # to a float: the store (or a later jump) rounds float16/bfloat16
        return b.let(f"{x.text}.to({compute(to)})", to)
    if to.is_float:
        # why: torch converts float64 to float16/bfloat16 through float32 (their constructors take a float)
        via = ".to(tl.float32)" if src is D.FLOAT64 and to in NARROW else ""
        tail = ".to(tl.float32)" if to in NARROW else ""
        return b.let(f"{rounded(x)}{via}.to({storage(to)}){tail}", to, True)
    # why: float -> narrow int through int32 wraps out-of-range values as torch's CPU conversion does
    via = ".to(tl.int32)" if to.bits < 32 else ""
    return b.let(f"{rounded(x)}{via}.to({compute(to)})", to)


_QRANGE = {D.INT8: (-128, 127), D.UINT8: (0, 255)}


def _quantize_precision(n: Node) -> DType:
    """The type QuantizeLinear divides in: its `precision` attribute, else the scale's (as the reference)."""
    p = n.attrs.get("precision")
    return p if p in F32 else n.inputs[1].dtype  # type: ignore[union-attr]


def reciprocal(scale: float) -> float:
    """1 / scale in float32, rounded as IEEE division rounds it (inf where it overflows): the factor `km.quotient`
    corrects its product with, formed on the host once per kernel."""
    return float(torch.tensor(1.0) / torch.tensor(scale, dtype=torch.float32))


def _quantize(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    """y = saturate(round_half_even(x / scale) + zero_point) to int8/uint8, per tensor. The quotient is formed in
    the precision's type: float32 division of two values of that type rounded once to it is the exactly rounded
    narrow quotient (float32 carries more than twice their significand bits)."""
    x, s, out = _x(xs, 0), _x(xs, 1), _out(n)
    zp = xs[2] if len(xs) > 2 else None
    prec = _quantize_precision(n)

    def as_prec(e: Expr) -> str:
        if e.dtype is prec:
            return rounded(e)
        return f"{rounded(e)}.to({storage(prec)})" + (".to(tl.float32)" if prec in NARROW else "")

    sp = as_prec(s)
    r = None  # a baked constant: its float32 reciprocal, rounded as IEEE division rounds it (when finite)
    if s.value is not None:
        rv = reciprocal(in_dtype(float(s.value), prec))
        r = float_text(rv) if math.isfinite(rv) else None
    if b.reciprocal_quotients:
        q = f"({as_prec(x)} * {r or f'tl.div_rn(1.0, {sp})'})"
    elif r is not None:  # the IEEE quotient (Triton's `/` is div.full.f32, up to 2 ulps off)
        q = f"km.quotient({as_prec(x)}, {sp}, {r})"
    else:  # a computed scale (or one whose reciprocal overflows): IEEE division per value
        xv = b.let(as_prec(x), D.FLOAT32).text
        q = f"tl.div_rn({xv}, tl.zeros_like({xv}) + {sp})"
    if prec in NARROW:
        q = f"{q}.to({storage(prec)}).to(tl.float32)"
    if out is FP8:  # saturate to +-448 (NaN stays NaN); the store's conversion rounds to nearest even
        m, t = float_text(FP8_MAX), b.let(q, D.FLOAT32).text
        return b.let(f"tl.where({t} != {t}, {t}, tl.minimum(tl.maximum({t}, -{m}), {m}))", out, False)
    lo, hi = _QRANGE[out]
    z = "-0.0" if zp is None or zp.value == 0 else f"{zp.text}.to(tl.float32)"
    return b.let(f"km.round_to_8bit({q}, {lo}.0, {hi}.0, {z}).to({storage(out)})", out)


def _quantize_check(n: Node) -> str | None:
    x, scale = n.inputs[0], n.inputs[1]
    zp = n.inputs[2] if len(n.inputs) > 2 else None
    out = n.outputs[0].dtype
    if x is None or scale is None or x.dtype not in F32 or scale.dtype not in F32 or (out not in _QRANGE
                                                                                      and out is not FP8):
        return "QuantizeLinear is generated from float16/bfloat16/float32 to int8/uint8/float8 E4M3 only"
    if out is FP8 and (int(n.attrs.get("saturate", 1)) != 1 or not _zero_constant(zp)):
        return "QuantizeLinear to float8 is generated saturating, with a zero point of 0 only"
    if int(n.attrs.get("block_size") or 0) or _quantize_precision(n) not in F32:
        return "blocked or float64 quantization is not generated"
    return None if _per_tensor(scale, zp) else "QuantizeLinear is generated with a per-tensor scale and zero point only"


def _dequantize(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    """y = (x - zero_point) * scale from int8/uint8, per tensor: the difference is exact in int32 and its product
    with the scale is formed in float32 then rounded once to the output type, as the reference computes it."""
    x, s = _x(xs, 0), _x(xs, 1)
    zp = xs[2] if len(xs) > 2 else None
    diff = f"{x.text}.to(tl.int32)" + ("" if zp is None else f" - {zp.text}.to(tl.int32)")
    return b.let(f"({diff}).to(tl.float32) * {rounded(s)}", _out(n))


def _dequantize_check(n: Node) -> str | None:
    x, scale = n.inputs[0], n.inputs[1]
    zp = n.inputs[2] if len(n.inputs) > 2 else None
    if x is None or scale is None or x.dtype not in _QRANGE or scale.dtype not in F32 or _out(n) not in F32:
        return "DequantizeLinear is generated from int8/uint8 to float16/bfloat16/float32 only"
    if int(n.attrs.get("block_size") or 0):
        return "blocked dequantization is not generated"
    return None if _per_tensor(scale, zp) else \
        "DequantizeLinear is generated with a per-tensor scale and zero point only"


def _per_tensor(*params: Value | None) -> bool:
    """Whether each given (present) scale / zero point holds one value (a dimension of unknown size counts as more)."""
    return all(v is None or (v.shape is not None and math.prod(d if isinstance(d, int) else 2 for d in v.shape) == 1)
               for v in params)


def _zero_constant(v: Value | None) -> bool:
    return v is None or (isinstance(v.data, torch.Tensor) and not bool((v.data.float() != 0).any()))


def _is_inf(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x = _x(xs)
    r = rounded(x)
    top = "1.7976931348623157e308" if x.dtype is D.FLOAT64 else "3.4028234663852886e38"
    parts = [f"({r} > {top})"] * n.attrs["detect_positive"] + [f"({r} < -{top})"] * n.attrs["detect_negative"]
    return b.let(" | ".join(parts) if parts else f"({r} < 0) & ({r} > 0)", D.BOOL)


def _threshold(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x = _x(xs)
    alpha = float_text(in_dtype(n.attrs["alpha"], x.dtype))
    return b.let(f"tl.where({rounded(x)} > {alpha}, {x.text}, 0.0)", x.dtype, x.exact)


def _shrink(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    x = _x(xs)
    lam, bias = (float_text(via_tensor(n.attrs[k], x.dtype)) for k in ("lambd", "bias"))
    r = rounded(x)
    return b.let(f"tl.where({r} < -{lam}, {x.text} + {bias}, tl.where({r} > {lam}, {x.text} - {bias}, 0.0))", x.dtype)


def _attr(n: Node, key: str) -> str:
    return float_text(n.attrs[key])


def _elu(x: str, n: Node) -> str:
    return f"tl.where({x} > 0, {x}, {_attr(n, 'alpha')} * km.expm1({x}))"


def _gelu(x: str, n: Node) -> str:
    if n.attrs["approximate"] == "tanh":
        return f"km.gelu_tanh({x})"
    if n.outputs[0].dtype in NARROW:  # why: half the instructions; as accurate where the output can tell
        return f"km.gelu_narrow({x})"
    return f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"


def _swiglu(b: Builder, n: Node, xs: list[Expr | None]) -> Expr:
    a, c = _x(xs, 0), _x(xs, 1)
    return b.let(f"{a.text} * km.sigmoid({_attr(n, 'alpha')} * {a.text}) * {c.text}", _out(n))


def _swiglu_check(n: Node) -> str | None:
    a, c = n.inputs[0], n.inputs[1]
    if a is None or c is None or a.shape != c.shape or a.shape is None or not all(isinstance(d, int) for d in a.shape):
        return "SwiGLU needs two inputs of one static shape"
    return None


# --- the table ------------------------------------------------------------------------------------------

_F = FLOATS
RULES: dict[str, Rule] = {
    "Identity": Rule(_identity, dtypes(SUPPORTED)),
    "Expand": Rule(_identity, dtypes(SUPPORTED, at=(0,)), data=(0,)),
    "Cast": Rule(_cast, dtypes(SUPPORTED)),
    "Add": Rule(_arith("+"), dtypes(NUMERIC)),
    "Sub": Rule(_arith("-"), dtypes(NUMERIC)),
    "Mul": Rule(_arith("*"), dtypes(NUMERIC)),
    "Div": Rule(_arith("/"), dtypes(FLOATS)),
    "Mod": Rule(_mod, dtypes(frozenset({D.FLOAT16}))),
    "Pow": Rule(_pow, _pow_check),
    "Max": Rule(_fold(maximum, keeps=True), dtypes(NUMERIC)),
    "Min": Rule(_fold(minimum, keeps=True), dtypes(NUMERIC)),
    "Sum": Rule(_fold(lambda a, c, dt: f"{a} + {c}"), dtypes(FLOATS)),
    "Mean": Rule(_fold(lambda a, c, dt: f"{a} + {c}", mean=True), dtypes(FLOATS)),
    "Equal": Rule(_compare("=="), dtypes(NUMERIC | BOOL, BOOL)),
    "Greater": Rule(_compare(">"), dtypes(NUMERIC, BOOL)),
    "Less": Rule(_compare("<"), dtypes(NUMERIC, BOOL)),
    "GreaterOrEqual": Rule(_compare(">="), dtypes(NUMERIC, BOOL)),
    "LessOrEqual": Rule(_compare("<="), dtypes(NUMERIC, BOOL)),
    "And": Rule(_logic("&"), dtypes(BOOL)),
    "Or": Rule(_logic("|"), dtypes(BOOL)),
    "Xor": Rule(_logic("^"), dtypes(BOOL)),
    "Not": Rule(lambda b, n, xs: b.let(f"{_x(xs).text} == 0", D.BOOL), dtypes(BOOL)),
    "BitwiseAnd": Rule(_logic("&"), dtypes(INTS)),
    "BitwiseOr": Rule(_logic("|"), dtypes(INTS)),
    "BitwiseXor": Rule(_logic("^"), dtypes(INTS)),
    # uint8 as xor with 0xFF: the same bits, and `~` on an unsigned tensor makes the interpreter build -1
    "BitwiseNot": Rule(lambda b, n, xs: b.let(_wrap(_bitwise_not(_x(xs).text, _out(n)), _out(n)), _out(n)),
                       dtypes(INTS)),
    "Where": Rule(_where, dtypes(SUPPORTED)),
    "Clip": Rule(_clip, dtypes(NUMERIC, extra=_clip_check)),
    "QuantizeLinear": Rule(_quantize, _quantize_check),
    "DequantizeLinear": Rule(_dequantize, _dequantize_check),
    "PRelu": Rule(_prelu, dtypes(FLOATS | {D.INT32, D.INT64})),
    "IsNaN": Rule(lambda b, n, xs: b.let(f"{_x(xs).text} != {_x(xs).text}", D.BOOL), dtypes(FLOATS, BOOL)),
    "IsInf": Rule(_is_inf, dtypes(FLOATS, BOOL)),
    "Abs": Rule(_abs, dtypes(NUMERIC)),
    "Neg": Rule(_neg, dtypes(FLOATS | SIGNED)),
    "Sign": Rule(_sign, dtypes(NUMERIC)),
    "Relu": Rule(_relu, dtypes(FLOATS | SIGNED)),
    "ThresholdedRelu": Rule(_threshold, dtypes(FLOATS)),
    "Shrink": Rule(_shrink, dtypes(FLOATS)),
    "SwiGLU": Rule(_swiglu, dtypes(F32, extra=_swiglu_check)),
    "Reciprocal": floating(lambda x, n: f"1.0 / {x}", f64=True),
    "Ceil": floating(lambda x, n: f"tl.ceil({x})", f64=True, jumps=True),
    "Floor": floating(lambda x, n: f"tl.floor({x})", f64=True, jumps=True),
    "Round": floating(lambda x, n: f"km.round_even({x})", f64=True, jumps=True),
    "Sqrt": floating(lambda x, n: f"tl.sqrt({x})", f64=True),
    "Exp": floating(lambda x, n: f"tl.exp({x})"),
    "Log": floating(lambda x, n: f"tl.log({x})"),
    "Erf": floating(lambda x, n: f"tl.erf({x})"),
    "Sin": floating(lambda x, n: f"tl.sin({x})"),
    "Cos": floating(lambda x, n: f"tl.cos({x})"),
    "Tan": floating(lambda x, n: f"tl.sin({x}) / tl.cos({x})"),
    **{op: floating(lambda x, n: f"km.{n.op.lower()}({x})")
       for op in ("Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Tanh", "Sigmoid")},
    "LeakyRelu": floating(lambda x, n: f"tl.where({x} > 0, {x}, {x} * {_attr(n, 'alpha')})", f64=True),
    "Elu": floating(_elu),
    "Celu": floating(lambda x, n: f"tl.where({x} > 0, {x}, {_attr(n, 'alpha')} * km.expm1({x} / {_attr(n, 'alpha')}))"),
    "Selu": floating(lambda x, n: f"{_attr(n, 'gamma')} * {_elu(x, n)}"),
    "HardSigmoid": floating(lambda x, n: _clamp01(f"{_attr(n, 'alpha')} * {x} + {_attr(n, 'beta')}"), f64=True),
    "HardSwish": floating(lambda x, n: f"{x} * {_clamp01(f'{x} / 6.0 + 0.5')}", f64=True),
    "Softplus": floating(lambda x, n: _softplus(x)),
    "Softsign": floating(lambda x, n: f"{x} / (1.0 + tl.abs({x}))", f64=True),
    "Mish": floating(lambda x, n: f"km.mish({x})"),
    "Gelu": floating(_gelu),
    "Swish": floating(lambda x, n: f"{x} * km.sigmoid({_attr(n, 'alpha')} * {x})"),
}
"""Every op the generator takes. Missing on purpose: BitShift (shifts past the width), integer Div/Mod (a zero
divisor must raise), Mod on float32/bfloat16/float64 (no exact fmod from Triton's core math), Pow on integer
bases, float64 transcendental functions, Erf/Shrink on integers."""


def reason(n: Node) -> str | None:
    """Why node n cannot be generated, or None."""
    rule = RULES.get(n.op)
    if rule is None:
        return f"op {n.op} is not generated"
    if len(n.outputs) != 1 or n.subgraphs():
        return f"{n.op} with {len(n.outputs)} outputs or subgraphs is not generated"
    return rule.check(n)
