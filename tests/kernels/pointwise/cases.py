"""Cases for the generated pointwise kernels: a graph, its inputs, and how to call the kernel; `run_case` checks one
against the op table's reference. Shared by the CPU interpreter worker (`tests/kernels/interpreted.py`,
TRITON_INTERPRET=1) and the GPU test. Importing this module imports no triton; `run_case` does (through the kernel)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kiln.ir import DType, Graph, Node, TensorType, Value
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx

D = DType
F32, F16, BF16, F64 = D.FLOAT32, D.FLOAT16, D.BFLOAT16, D.FLOAT64
NAN, INF = float("nan"), float("inf")


@dataclass
class Case:
    graph: Graph
    inputs: list[torch.Tensor]
    """The kernel's inputs (CPU tensors; moved to the device by `run_case`)."""
    expected: list[torch.Tensor] | None = None
    """The reference outputs; default: the graph run by the op table on `inputs`."""
    alias: int | None = None
    """Call with out=[inputs[alias]] (in place)."""
    out_strided: bool = False
    """Call with non-contiguous out tensors."""
    channels_last: bool = False
    """Ask for channels-last new outputs (`PointwiseKernel.channels_last_outputs`) and check that they are."""
    block: int = 1024
    num_warps: int = 4
    wide: bool = False
    """Force int64 index math."""
    rtol: dict[DType, float] = field(default_factory=dict)


# --- inputs -----------------------------------------------------------------------------------------------


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


class Inputs:
    """Deterministic random tensors for one case."""

    def __init__(self, name: str) -> None:
        self.g = _gen(name)

    def randn(self, *shape: int, dtype: DType = F32, scale: float = 1.0, specials: bool = False) -> torch.Tensor:
        x = torch.randn(shape, generator=self.g, dtype=torch.float64) * scale
        if specials and x.numel() >= 8:
            x.view(-1)[:6] = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 1e-9], dtype=torch.float64)
        return x.to(dtype.torch)

    def uniform(self, lo: float, hi: float, *shape: int, dtype: DType = F32) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(shape, generator=self.g, dtype=torch.float64)).to(dtype.torch)

    def ints(self, lo: int, hi: int, *shape: int, dtype: DType = D.INT32) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=self.g, dtype=torch.int64).to(dtype.torch)

    def bools(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.g) > 0.5

    def halves(self, *shape: int, dtype: DType = F32) -> torch.Tensor:
        """Values with ties (k + 0.5) and random fractions, both signs."""
        x = torch.randint(-8, 8, shape, generator=self.g).double() + 0.5
        mix = torch.rand(shape, generator=self.g) > 0.5
        x = torch.where(mix, x, torch.randn(shape, generator=self.g, dtype=torch.float64) * 4)
        return x.to(dtype.torch)


# --- graphs -------------------------------------------------------------------------------------------------


def graph(*specs: tuple[DType, Sequence[Any]]) -> tuple[Graph, list[Value]]:
    g = Graph("case")
    return g, [g.add_input(f"x{i}", TensorType(dt, tuple(s))) for i, (dt, s) in enumerate(specs)]


def dt_of(t: torch.Tensor) -> DType:
    return DType.from_torch(t.dtype)


def op_case(op: str, xs: Sequence[torch.Tensor | None], n_out: int = 1, **attrs: Any) -> Case:
    """One node of `op` over graph inputs (None: an omitted optional input)."""
    g = Graph("case")
    vals: list[Value | None] = [None if x is None else g.add_input(f"x{i}", TensorType(dt_of(x), tuple(x.shape)))
                                for i, x in enumerate(xs)]
    g.outputs = list(g.add(op, vals, attrs, outputs=n_out))
    return Case(g, [x for x in xs if x is not None])


CASES: dict[str, Callable[[Inputs], Case]] = {}


def case(name: str) -> Callable[[Callable[[Inputs], Case]], Callable[[Inputs], Case]]:
    def deco(fn: Callable[[Inputs], Case]) -> Callable[[Inputs], Case]:
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return deco


# --- single float ops ---------------------------------------------------------------------------------------

SHAPE = (3, 5, 7)

_UNARY: dict[str, tuple[Callable[[Inputs, DType], torch.Tensor], dict[str, Any]]] = {
    "Abs": (lambda r, dt: r.randn(*SHAPE, dtype=dt, specials=True), {}),
    "Neg": (lambda r, dt: r.randn(*SHAPE, dtype=dt, specials=True), {}),
    "Sign": (lambda r, dt: r.randn(*SHAPE, dtype=dt, specials=True), {}),
    "Reciprocal": (lambda r, dt: r.randn(*SHAPE, dtype=dt, specials=True), {}),
    "Ceil": (lambda r, dt: r.halves(*SHAPE, dtype=dt), {}),
    "Floor": (lambda r, dt: r.halves(*SHAPE, dtype=dt), {}),
    "Round": (lambda r, dt: r.halves(*SHAPE, dtype=dt), {}),
    "Sqrt": (lambda r, dt: r.randn(*SHAPE, dtype=dt, specials=True).abs(), {}),
    "Exp": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=3, specials=True), {}),
    "Log": (lambda r, dt: r.uniform(1e-3, 50, *SHAPE, dtype=dt), {}),
    "Erf": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=2, specials=True), {}),
    "Sin": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=3), {}),
    "Cos": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=3), {}),
    "Tan": (lambda r, dt: r.uniform(-1.4, 1.4, *SHAPE, dtype=dt), {}),
    "Asin": (lambda r, dt: r.uniform(-1, 1, *SHAPE, dtype=dt), {}),
    "Acos": (lambda r, dt: r.uniform(-1, 1, *SHAPE, dtype=dt), {}),
    "Atan": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=4, specials=True), {}),
    "Sinh": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=3, specials=True), {}),
    "Cosh": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=3, specials=True), {}),
    "Asinh": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=5, specials=True), {}),
    "Acosh": (lambda r, dt: r.uniform(1, 6, *SHAPE, dtype=dt), {}),
    "Atanh": (lambda r, dt: r.uniform(-0.99, 0.99, *SHAPE, dtype=dt), {}),
    "Tanh": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=2, specials=True), {}),
    "Sigmoid": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=5, specials=True), {}),
    "Relu": (lambda r, dt: r.randn(*SHAPE, dtype=dt, specials=True), {}),
    "LeakyRelu": (lambda r, dt: r.randn(*SHAPE, dtype=dt, specials=True), {"alpha": 0.2}),
    "Elu": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=2, specials=True), {"alpha": 0.5}),
    "Celu": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=2, specials=True), {"alpha": 2.0}),
    "Selu": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=2, specials=True), {}),
    "ThresholdedRelu": (lambda r, dt: r.halves(*SHAPE, dtype=dt), {"alpha": 0.5}),
    "HardSigmoid": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=3, specials=True), {"alpha": 0.3, "beta": 0.4}),
    "HardSwish": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=4), {}),
    "Softplus": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=10, specials=True), {}),
    "Softsign": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=3), {}),
    "Mish": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=3), {}),
    "Gelu": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=3), {"approximate": "none"}),
    "Swish": (lambda r, dt: r.randn(*SHAPE, dtype=dt, scale=3), {"alpha": 1.5}),
    "Shrink": (lambda r, dt: r.halves(*SHAPE, dtype=dt) / 4, {"bias": 0.2, "lambd": 0.375}),
    "IsNaN": (lambda r, dt: r.randn(*SHAPE, dtype=dt, specials=True), {}),
    "IsInf": (lambda r, dt: r.randn(*SHAPE, dtype=dt, specials=True), {}),
}


def _unary(op: str, dt: DType, attrs: dict[str, Any]) -> Callable[[Inputs], Case]:
    return lambda r: op_case(op, [_UNARY[op][0](r, dt)], **attrs)


for _op, (_, _attrs) in _UNARY.items():
    for _dt in (F32, F16):
        case(f"{_op}-{_dt}")(_unary(_op, _dt, _attrs))
for _dt in (F32, F16):
    case(f"Gelu-tanh-{_dt}")(_unary("Gelu", _dt, {"approximate": "tanh"}))
    case(f"IsInf-pos-{_dt}")(_unary("IsInf", _dt, {"detect_negative": 0}))
    case(f"IsInf-neg-{_dt}")(_unary("IsInf", _dt, {"detect_positive": 0}))
    case(f"IsInf-none-{_dt}")(_unary("IsInf", _dt, {"detect_positive": 0, "detect_negative": 0}))
for _op in ("Sigmoid", "Tanh", "Round", "Exp"):
    case(f"{_op}-bfloat16")(_unary(_op, BF16, {}))
for _op in ("Abs", "Neg", "Sign", "Reciprocal", "Ceil", "Floor", "Round", "Sqrt", "Relu", "LeakyRelu",
            "ThresholdedRelu", "HardSigmoid", "HardSwish", "Softsign", "Shrink", "IsNaN", "IsInf"):
    case(f"{_op}-float64")(_unary(_op, F64, _UNARY[_op][1]))


# --- binary and variadic float ops ------------------------------------------------------------------------


def _binary(op: str, dt: DType, **attrs: Any) -> Callable[[Inputs], Case]:
    def make(r: Inputs) -> Case:
        a, b = r.randn(*SHAPE, dtype=dt, scale=3), r.randn(*SHAPE, dtype=dt, scale=3)
        a.view(-1)[:4] = torch.tensor([NAN, 1.0, INF, 0.0]).to(a.dtype)
        b.view(-1)[:4] = torch.tensor([1.0, NAN, 2.0, 0.0]).to(a.dtype)
        return op_case(op, [a, b], **attrs)

    return make


def _variadic(op: str, dt: DType) -> Callable[[Inputs], Case]:
    return lambda r: op_case(op, [r.randn(*SHAPE, dtype=dt), r.randn(5, 7, dtype=dt), r.randn(7, dtype=dt)])


def _compare(op: str, dt: DType) -> Callable[[Inputs], Case]:
    def make(r: Inputs) -> Case:
        a = r.ints(-3, 3, *SHAPE, dtype=dt) if not dt.is_float else r.ints(-3, 3, *SHAPE).to(dt.torch)
        b = r.ints(-3, 3, *SHAPE, dtype=dt) if not dt.is_float else r.ints(-3, 3, *SHAPE).to(dt.torch)
        if dt.is_float:
            a.view(-1)[0] = NAN
        return op_case(op, [a, b])

    return make


for _dt in (F32, F16, F64):
    for _op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
        case(f"{_op}-{_dt}")(_binary(_op, _dt))
    for _op in ("Max", "Min", "Sum", "Mean"):
        case(f"{_op}-3-{_dt}")(_variadic(_op, _dt))
    for _op in ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"):
        case(f"{_op}-{_dt}")(_compare(_op, _dt))
for _dt in (D.INT8, D.INT32, D.INT64, D.UINT8):
    for _op in ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"):
        case(f"{_op}-{_dt}")(_compare(_op, _dt))


@case("Mod-fmod0-float16")
def _mod0(r: Inputs) -> Case:
    a, b = r.randn(*SHAPE, dtype=F16, scale=20), r.randn(*SHAPE, dtype=F16, scale=3)
    a.view(-1)[:6] = torch.tensor([6.0, -6.0, 5.5, -5.5, 1.0, 30000.0]).half()
    b.view(-1)[:6] = torch.tensor([3.0, 3.0, -2.0, -2.0, INF, 0.001]).half()
    return op_case("Mod", [a, b], fmod=0)


@case("Mod-fmod1-float16")
def _mod1(r: Inputs) -> Case:
    a, b = r.randn(*SHAPE, dtype=F16, scale=20), r.randn(*SHAPE, dtype=F16, scale=3)
    a.view(-1)[:6] = torch.tensor([6.0, -6.0, 5.5, -5.5, -1.0, 30000.0]).half()
    b.view(-1)[:6] = torch.tensor([3.0, 3.0, -2.0, -2.0, -INF, 0.001]).half()
    return op_case("Mod", [a, b], fmod=1)


def _pow(dt: DType, exponent: Callable[[Inputs], torch.Tensor], base: str = "any") -> Callable[[Inputs], Case]:
    def make(r: Inputs) -> Case:
        x = r.randn(*SHAPE, dtype=dt, scale=2)
        if base == "pos":
            x = x.abs() + 0.1
        else:
            x.view(-1)[:8] = torch.tensor([0.0, -0.0, 1.0, -1.0, INF, -INF, NAN, -2.0]).to(x.dtype)
        return op_case("Pow", [x, exponent(r)])

    return make


for _dt in (F32, F16):
    case(f"Pow-scalar2-{_dt}")(_pow(_dt, lambda r: torch.tensor(2.0)))
    case(f"Pow-scalar-0.5-{_dt}")(_pow(_dt, lambda r: torch.tensor(0.5), "pos"))
    case(f"Pow-scalar-neg1.5-{_dt}")(_pow(_dt, lambda r: torch.tensor(-1.5), "pos"))
    case(f"Pow-int-exponents-{_dt}")(_pow(_dt, lambda r: r.ints(-3, 4, *SHAPE, dtype=D.INT64)))
    case(f"Pow-float-exponents-{_dt}")(_pow(_dt, lambda r: r.ints(-3, 4, *SHAPE).float() / 2))
case("Pow-exp-float16-base-float32")(_pow(F32, lambda r: r.uniform(-2, 2, *SHAPE, dtype=F16), "pos"))


@case("Pow-special-exponents-float32")
def _pow_special(r: Inputs) -> Case:
    x = torch.tensor([0.5, 2.0, 1.0, -1.0, -1.0, NAN, 1.0, 0.0, -0.0, 3.0, -3.0, -INF])
    y = torch.tensor([INF, -INF, NAN, INF, -INF, 0.0, INF, -1.0, -1.0, 0.0, 3.0, 0.5])
    return op_case("Pow", [x, y])


@case("Pow-literal2-float32")
def _pow_literal(r: Inputs) -> Case:
    g, (x,) = graph((F32, SHAPE))
    two = g.add_initializer("two", torch.tensor(2.0))
    g.outputs = list(g.add("Pow", [x, two]))
    return Case(g, [r.randn(*SHAPE)])


for _dt in (F32, F16):
    case(f"Where-{_dt}")(lambda r, dt=_dt: op_case("Where", [r.bools(5, 1), r.randn(*SHAPE, dtype=dt),
                                                              r.randn(7, dtype=dt)]))
    case(f"Clip-both-{_dt}")(lambda r, dt=_dt: op_case("Clip", [r.randn(*SHAPE, dtype=dt, specials=True),
                                                                 torch.tensor(-0.5).to(dt.torch),
                                                                 torch.tensor([0.75]).to(dt.torch)]))
    case(f"Clip-min-{_dt}")(lambda r, dt=_dt: op_case("Clip", [r.randn(*SHAPE, dtype=dt, specials=True),
                                                                torch.tensor(-0.5).to(dt.torch)]))
    case(f"Clip-max-{_dt}")(lambda r, dt=_dt: op_case("Clip", [r.randn(*SHAPE, dtype=dt, specials=True), None,
                                                                torch.tensor(0.25).to(dt.torch)]))
    case(f"Clip-none-{_dt}")(lambda r, dt=_dt: op_case("Clip", [r.randn(*SHAPE, dtype=dt, specials=True)]))
    case(f"Clip-crossed-{_dt}")(lambda r, dt=_dt: op_case("Clip", [r.randn(*SHAPE, dtype=dt),
                                                                    torch.tensor(1.0).to(dt.torch),
                                                                    torch.tensor(-1.0).to(dt.torch)]))
    case(f"PRelu-{_dt}")(lambda r, dt=_dt: op_case("PRelu", [r.randn(2, 5, 3, 4, dtype=dt, specials=True),
                                                              r.randn(5, 1, 1, dtype=dt)]))
    case(f"SwiGLU-{_dt}")(lambda r, dt=_dt: op_case("SwiGLU", [r.randn(*SHAPE, dtype=dt, scale=3),
                                                                r.randn(*SHAPE, dtype=dt)], alpha=1.25))
case("Where-int64")(lambda r: op_case("Where", [r.bools(*SHAPE), r.ints(-9, 9, *SHAPE, dtype=D.INT64),
                                                r.ints(-9, 9, 7, dtype=D.INT64)]))
case("Where-bool")(lambda r: op_case("Where", [r.bools(*SHAPE), r.bools(*SHAPE), r.bools(1)]))


# --- integer and bool ops ---------------------------------------------------------------------------------

_RANGE = {D.INT8: (-128, 128), D.UINT8: (0, 256), D.INT16: (-32768, 32768), D.INT32: (-2**31, 2**31),
          D.INT64: (-2**62, 2**62)}


def _int_op(op: str, dt: DType, n: int = 2, **attrs: Any) -> Callable[[Inputs], Case]:
    lo, hi = _RANGE[dt]
    return lambda r: op_case(op, [r.ints(lo, hi, *SHAPE, dtype=dt) for _ in range(n)], **attrs)


for _dt in (D.INT8, D.INT16, D.INT32, D.INT64, D.UINT8):
    for _op in ("Add", "Sub", "Mul", "Max", "Min", "BitwiseAnd", "BitwiseOr", "BitwiseXor"):
        case(f"{_op}-{_dt}")(_int_op(_op, _dt))
    for _op in ("Abs", "Sign", "BitwiseNot"):
        case(f"{_op}-{_dt}")(_int_op(_op, _dt, 1))
for _dt in (D.INT8, D.INT32, D.INT64):
    case(f"Neg-{_dt}")(_int_op("Neg", _dt, 1))
    case(f"Relu-{_dt}")(_int_op("Relu", _dt, 1))
case("Abs-int8-min")(lambda r: op_case("Abs", [torch.tensor([-128, -1, 0, 127], dtype=torch.int8)]))
case("Clip-int32")(lambda r: op_case("Clip", [r.ints(-50, 50, *SHAPE), torch.tensor(-7, dtype=torch.int32),
                                              torch.tensor(9, dtype=torch.int32)]))
case("PRelu-int32")(lambda r: op_case("PRelu", [r.ints(-50, 50, *SHAPE), r.ints(-3, 4, 7)]))
case("Equal-bool")(lambda r: op_case("Equal", [r.bools(*SHAPE), r.bools(7)]))
for _op in ("And", "Or", "Xor"):
    case(f"{_op}-bool")(lambda r, op=_op: op_case(op, [r.bools(*SHAPE), r.bools(5, 1)]))
case("Not-bool")(lambda r: op_case("Not", [r.bools(*SHAPE)]))


# --- casts ------------------------------------------------------------------------------------------------

_CAST_TARGETS = (F32, F16, BF16, F64, D.INT8, D.INT16, D.INT32, D.INT64, D.BOOL)


def _cast_all(src: DType, make: Callable[[Inputs], torch.Tensor],
              targets: Sequence[DType] = _CAST_TARGETS) -> Callable[[Inputs], Case]:
    def build(r: Inputs) -> Case:
        x = make(r)
        g, (v,) = graph((src, tuple(x.shape)))
        g.outputs = [g.add("Cast", [v], {"to": to})[0] for to in targets]
        return Case(g, [x])

    return build


def _cast_values(dt: DType) -> Callable[[Inputs], torch.Tensor]:
    def make(r: Inputs) -> torch.Tensor:
        x = (r.halves(*SHAPE) * 12).clamp(-127, 127)
        x.view(-1)[:4] = torch.tensor([0.0, -0.0, 0.25, -100.75])
        return x.to(dt.torch)

    return make


for _dt in (F32, F16, BF16, F64):
    case(f"Cast-from-{_dt}")(_cast_all(_dt, _cast_values(_dt)))
for _dt in (D.INT8, D.INT32, D.INT64, D.UINT8):
    case(f"Cast-from-{_dt}")(_cast_all(_dt, lambda r, dt=_dt: r.ints(*_RANGE[dt], *SHAPE, dtype=dt),
                                       (*_CAST_TARGETS, D.UINT8)))
case("Cast-from-bool")(_cast_all(D.BOOL, lambda r: r.bools(*SHAPE), (*_CAST_TARGETS, D.UINT8)))
case("Cast-float32-nchw-to-float16-channels-last")(lambda r: replace(
    op_case("Cast", [r.randn(2, 3, 5, 7)], to=F16), channels_last=True))
case("Relu-Neg-nchw-input-two-channels-last-outputs")(lambda r: replace(_two_outputs(r), channels_last=True))


@case("Cast-of-a-named-batch-input-to-channels-last")
def _cast_named_batch(r: Inputs) -> Case:
    """An engine's input Cast: the graph input keeps its named batch, the profile fixed the output's (2)."""
    g, (x,) = graph((F32, ("batch", 3, 5, 7)))
    (y,) = g.add("Cast", [x], {"to": F16})
    y.type = TensorType(F16, (2, 3, 5, 7))
    g.outputs = [y]
    return Case(g, [r.randn(2, 3, 5, 7)], channels_last=True)


@case("Cast-to-a-named-batch-output")
def _cast_to_named_output(r: Inputs) -> Case:
    """An engine's output Cast: computed at the profile's static size, the model's output declared (batch, 6)."""
    g, (x,) = graph((F16, (4, 6)))
    (y,) = g.add("Cast", [x], {"to": F32})
    y.type = TensorType(F32, ("batch", 6))
    g.outputs = [y]
    return Case(g, [r.randn(4, 6, dtype=F16)])


case("Cast-float32-to-uint8")(_cast_all(F32, lambda r: r.uniform(0, 255.9, *SHAPE), (D.UINT8,)))
case("Cast-specials-to-bool")(_cast_all(F32, lambda r: torch.tensor([NAN, INF, -0.0, 0.0, 1e-30]), (D.BOOL, F16)))


@case("Cast-after-float16-add")
def _cast_rounds(r: Inputs) -> Case:
    """The float32 cast of a float16 sum must see the rounded float16 value, as the reference does."""
    g, (a, b) = graph((F16, SHAPE), (F16, SHAPE))
    (s,) = g.add("Add", [a, b])
    g.outputs = [g.add("Cast", [s], {"to": F32})[0], g.add("Floor", [s])[0],
                 g.add("Equal", [s, a])[0], g.add("Cast", [s], {"to": D.INT32})[0]]
    x = r.randn(*SHAPE, dtype=F16, scale=100)
    return Case(g, [x, r.randn(*SHAPE, dtype=F16, scale=0.03)])


# --- DAGs, multiple outputs, constants --------------------------------------------------------------------


@case("dag-bias-gelu-residual-float16")
def _bias_gelu(r: Inputs) -> Case:
    g, (x, b, res) = graph((F16, (6, 40)), (F16, (40,)), (F16, (6, 40)))
    (y,) = g.add("Add", [x, b])
    (z,) = g.add("Gelu", [y])
    (w,) = g.add("Add", [z, res])
    g.outputs = [z, w]
    return Case(g, [r.randn(6, 40, dtype=F16), r.randn(40, dtype=F16), r.randn(6, 40, dtype=F16)])


@case("dag-diamond-passthrough-float32")
def _diamond(r: Inputs) -> Case:
    g, (x,) = graph((F32, (4, 9)))
    (e,) = g.add("Exp", [x])
    (a,) = g.add("Abs", [x])
    one = g.add_initializer("one", torch.tensor(1.0))
    (l,) = g.add("Log", [g.add("Add", [a, one])[0]])
    (m,) = g.add("Mul", [e, l])
    zero = g.add_initializer("zero", torch.tensor([0.0]))
    (pos,) = g.add("Greater", [x, zero])
    (d,) = g.add("Where", [pos, m, e])
    g.outputs = [d, e, x, d, pos]
    return Case(g, [r.randn(4, 9)])


@case("dag-normalize-affine-float16")
def _normalize(r: Inputs) -> Case:
    g, (x, mean, rstd, gamma, beta) = graph((F16, (8, 32)), (F16, (8, 1)), (F16, (8, 1)), (F16, (32,)),
                                            (F16, (32,)))
    (c,) = g.add("Sub", [x, mean])
    (n,) = g.add("Mul", [c, rstd])
    (y,) = g.add("Add", [g.add("Mul", [n, gamma])[0], beta])
    g.outputs = [y]
    return Case(g, [r.randn(8, 32, dtype=F16), r.randn(8, 1, dtype=F16), r.uniform(0.5, 2, 8, 1, dtype=F16),
                    r.randn(32, dtype=F16), r.randn(32, dtype=F16)])


@case("dag-mask-int-bool-float32")
def _mask(r: Inputs) -> Case:
    g, (x,) = graph((F32, SHAPE))
    zero, one = g.add_initializer("zero", torch.tensor(0.0)), g.add_initializer("one", torch.tensor(1.0))
    (pos,) = g.add("Greater", [x, zero])
    (cnt,) = g.add("Cast", [pos], {"to": D.INT32})
    (y,) = g.add("Where", [pos, x, g.add("Neg", [x])[0]])
    (z,) = g.add("And", [pos, g.add("Less", [x, one])[0]])
    (k,) = g.add("Add", [cnt, g.add("Cast", [z], {"to": D.INT32})[0]])
    g.outputs = [y, z, k]
    return Case(g, [r.randn(*SHAPE)])


@case("consts-scalar-and-vector-float16")
def _consts(r: Inputs) -> Case:
    g, (x,) = graph((F16, (5, 12)))
    s = g.add_initializer("s", torch.tensor(0.3, dtype=torch.float16))
    v = g.add_initializer("v", r.randn(12, dtype=F16))
    (y,) = g.add("Add", [g.add("Mul", [x, s])[0], v])
    g.outputs = [g.add("Sigmoid", [y])[0]]
    return Case(g, [r.randn(5, 12, dtype=F16)])


@case("nan-literal-and-attribute-float32")
def _nans(r: Inputs) -> Case:
    g, (x,) = graph((F32, SHAPE))
    nan = g.add_initializer("nan", torch.tensor(NAN))
    (y,) = g.add("LeakyRelu", [x], {"alpha": NAN})
    g.outputs = [y, g.add("Max", [x, nan])[0]]
    return Case(g, [r.randn(*SHAPE)])


@case("expand-const-shape-float32")
def _expand(r: Inputs) -> Case:
    g, (x, y) = graph((F32, (1, 6)), (F32, (4, 6)))
    shape = g.add_initializer("shape", torch.tensor([4, 6]))
    (e,) = g.add("Expand", [x, shape])
    g.outputs = [g.add("Mul", [e, y])[0], e]
    return Case(g, [r.randn(1, 6), r.randn(4, 6)])


@case("expand-only-grows-domain-float32")
def _expand_only(r: Inputs) -> Case:
    """Expand's shape arrives as a graph input (as in a Fused body, where constants become inputs); only the
    output type tells the domain, and the shape tensor itself is never loaded."""
    g, (x, shape) = graph((F32, (1, 5)), (D.INT64, (2,)))
    (e,) = g.add("Expand", [x, g.add_initializer("shape", torch.tensor([3, 5]))])
    g.nodes[-1].inputs[1] = shape
    g.outputs = [g.add("Relu", [e])[0]]
    return Case(g, [r.randn(1, 5), torch.tensor([3, 5])])


@case("output-is-scalar-broadcast-float32")
def _scalar_out(r: Inputs) -> Case:
    g, (s, x) = graph((F32, ()), (F32, (2, 3)))
    shape = g.add_initializer("shape", torch.tensor([2, 3]))
    g.outputs = [g.add("Expand", [s, shape])[0], g.add("Add", [x, s])[0]]
    return Case(g, [torch.tensor(1.5), r.randn(2, 3)])


# --- broadcasting, strides, sizes ------------------------------------------------------------------------


def _add_sigmoid(shapes: Sequence[Sequence[int]], dt: DType = F32, **kw: Any) -> Callable[[Inputs], Case]:
    def make(r: Inputs) -> Case:
        xs = [r.randn(*s, dtype=dt) for s in shapes]
        g, vals = graph(*[(dt, s) for s in shapes])
        acc = vals[0]
        for v in vals[1:]:
            (acc,) = g.add("Add", [acc, v])
        g.outputs = [g.add("Sigmoid", [acc])[0]]
        return Case(g, xs, **kw)

    return make


for _name, _shapes in {
    "bias-MN+N": [(33, 40), (40,)],
    "nchw-channel": [(2, 3, 5, 7), (1, 3, 1, 1)],
    "nchw-rank3-channel": [(2, 3, 5, 7), (3, 1, 1)],
    "scalar": [(7,), ()],
    "col-row": [(9, 1), (1, 11)],
    "col": [(9, 1), (9, 11)],
    "size1": [(1,)],
    "size7": [(7,)],
    "size1031": [(1031,)],
    "3x5x7x11": [(3, 5, 7, 11), (3, 5, 7, 11)],
    "empty": [(0, 5), (5,)],
}.items():
    case(f"bcast-{_name}-float32")(_add_sigmoid(_shapes))
    case(f"bcast-{_name}-float16")(_add_sigmoid(_shapes, F16))
case("block-even-128")(_add_sigmoid([(8, 128), (128,)], block=128, num_warps=2))
# Small blocks make the per-program index modes appear: "fixed" (period a multiple of BLOCK), "step" (period at
# least BLOCK), "div" (shorter), for a bias (innermost run), a column (outer run) and a channel (middle run).
for _block in (16, 32):
    for _name, _shapes in {
        "bias-N32": [(6, 32), (32,)], "bias-N40": [(6, 40), (40,)], "bias-N8": [(6, 8), (8,)],
        "col-M32": [(6, 1), (6, 32)], "col-M40": [(6, 1), (6, 40)],
        "channel-HW32": [(2, 3, 4, 8), (1, 3, 1, 1)], "channel-HW35": [(2, 3, 5, 7), (3, 1, 1)],
        "channel-HW8": [(2, 3, 2, 4), (3, 1, 1)],
    }.items():
        case(f"modes-{_name}-block{_block}")(_add_sigmoid(_shapes, F16, block=_block))
    case(f"modes-channel-HW35-wide-block{_block}")(_add_sigmoid([(2, 3, 5, 7), (3, 1, 1)], block=_block, wide=True))
    case(f"modes-bias-N40-wide-block{_block}")(_add_sigmoid([(6, 40), (40,)], block=_block, wide=True))
case("block-uneven-256")(_add_sigmoid([(1000,), (1000,)], block=256, num_warps=8))
case("wide-int64-index")(_add_sigmoid([(6, 40), (40,)], wide=True))
case("wide-int64-nchw-float16")(_add_sigmoid([(2, 3, 5, 7), (1, 3, 1, 1)], F16, wide=True))


def _strided(view: Callable[[torch.Tensor], torch.Tensor], base: Sequence[int], other: Sequence[int],
             dt: DType = F32) -> Callable[[Inputs], Case]:
    def make(r: Inputs) -> Case:
        x = view(r.randn(*base, dtype=dt))
        y = r.randn(*other, dtype=dt)
        g, (a, b) = graph((dt, tuple(x.shape)), (dt, tuple(y.shape)))
        g.outputs = [g.add("Mul", [g.add("Tanh", [a])[0], b])[0]]
        return Case(g, [x, y])

    return make


case("strided-transposed-float32")(_strided(lambda t: t.t(), (40, 24), (24, 40)))
case("strided-sliced-float16")(_strided(lambda t: t[:, ::3], (10, 30), (10, 10), F16))
case("strided-expanded-float32")(_strided(lambda t: t.expand(12, 16), (1, 16), (12, 16)))
case("strided-nhwc-view-float16")(_strided(lambda t: t.permute(0, 3, 1, 2), (2, 5, 6, 8), (1, 8, 1, 1), F16))
case("strided-offset-slice-float32")(_strided(lambda t: t[1:, 2:], (7, 9), (6, 7)))


@case("out-strided-float32")
def _out_strided(r: Inputs) -> Case:
    c = _add_sigmoid([(6, 10), (10,)])(r)
    c.out_strided = True
    return c


@case("inplace-alias-input-float16")
def _inplace(r: Inputs) -> Case:
    g, (x, b) = graph((F16, (16, 24)), (F16, (24,)))
    g.outputs = [g.add("Relu", [g.add("Add", [x, b])[0]])[0]]
    return Case(g, [r.randn(16, 24, dtype=F16), r.randn(24, dtype=F16)], alias=0)


# --- epilogues ------------------------------------------------------------------------------------------------


def epilogue_body(dt: DType, m: int = 12, k: int = 16, n: int = 20) -> Graph:
    """MatMul(a, w) + bias -> Gelu -> + residual, as epilogue fusion builds it (body.nodes[0] is the anchor)."""
    body, (a, w, bias, res) = graph((dt, (m, k)), (dt, (k, n)), (dt, (n,)), (dt, (m, n)))
    (acc,) = body.add("MatMul", [a, w])
    (y,) = body.add("Add", [acc, bias])
    (z,) = body.add("Gelu", [y])
    body.outputs = list(body.add("Add", [z, res]))
    return body


def _epilogue(dt: DType) -> Callable[[Inputs], Case]:
    def make(r: Inputs) -> Case:
        from kiln.kernels.pointwise.codegen import epilogue_graph

        body = epilogue_body(dt)
        xs = [r.randn(12, 16, dtype=dt), r.randn(16, 20, dtype=dt), r.randn(20, dtype=dt), r.randn(12, 20, dtype=dt)]
        found = epilogue_graph(body)
        assert found is not None, "epilogue_graph refused a supported body"
        g, idx = found
        assert idx == [2, 3], idx
        acc = (xs[0].float() @ xs[1].float()).to(dt.torch)
        want = reference(body, [x.clone() for x in xs])
        return Case(g, [acc, *(xs[i] for i in idx)], expected=want, alias=0)

    return make


case("epilogue-matmul-bias-gelu-residual-float32")(_epilogue(F32))
case("epilogue-matmul-bias-gelu-residual-float16")(_epilogue(F16))


# --- running -------------------------------------------------------------------------------------------------


def reference(g: Graph, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    node = Node("Fused", [], [], {"body": g, "kind": "pointwise"})
    return [t.contiguous() for t in OPS["Fused"].ref(RefCtx(node), list(xs))]


_RTOL = {F32: 2e-5, F64: 1e-12, F16: 2e-3, BF16: 1.6e-2}


def compare(got: torch.Tensor, want: torch.Tensor, rtol: float | None = None) -> str | None:
    """None when `got` matches `want`: exactly for integers and bools, within the dtype's tolerance (relative,
    plus the same fraction of the largest finite magnitude) for floats, NaN where NaN and infinities exact."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}"
    if not want.dtype.is_floating_point:
        bad = (got != want).nonzero()
        return None if not len(bad) else f"{len(bad)} mismatches, first at {bad[0].tolist()}: " \
            f"{got[tuple(bad[0])].item()} vs {want[tuple(bad[0])].item()}"
    g, w = got.double(), want.double()
    tol = rtol if rtol is not None else _RTOL[DType.from_torch(want.dtype)]
    finite = w[w.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    ok = torch.isclose(g, w, rtol=tol, atol=tol * max(scale, 1e-3), equal_nan=True)
    ok |= (g == w)  # infinities of the same sign
    if bool(ok.all()):
        return None
    i = tuple((~ok).nonzero()[0].tolist())
    return f"{int((~ok).sum())} of {w.numel()} differ (rtol {tol}), first at {list(i)}: {g[i].item()} vs {w[i].item()}"


def build(name: str) -> Case:
    return CASES[name](Inputs(name))


def run_case(name: str, device: str = "cpu") -> str | None:
    """None when the kernel for case `name` matches the reference on `device`, else what differs."""
    from kiln.kernels.pointwise import codegen, layout

    c = build(name)
    want = c.expected if c.expected is not None else reference(c.graph, [x.clone() for x in c.inputs])
    xs = [x.to(device) for x in c.inputs]
    before = [x.clone() for x in xs]
    kernel = codegen.PointwiseKernel(c.graph, block=c.block, num_warps=c.num_warps)
    if c.channels_last:
        kernel.channels_last_outputs = (True,) * len(c.graph.outputs)
    out = None
    if c.alias is not None:
        out = [xs[c.alias]]
    elif c.out_strided:
        out = [torch.empty((*w.shape, 2), dtype=w.dtype, device=device)[..., 1] for w in want]
    limit = layout.WIDE_LIMIT
    if c.wide:
        layout.WIDE_LIMIT = 0
    try:
        got = kernel(xs, out=out)
    finally:
        layout.WIDE_LIMIT = limit
    if c.wide and not all(lay.wide for lay in kernel._fns):
        return "the int64 index path was not taken"
    if out is not None and not all(g is o for g, o in zip(got, out)):
        return "the out tensors were not returned"
    if c.channels_last and not all(g.dim() != 4 or g.is_contiguous(memory_format=torch.channels_last) for g in got):
        return f"asked for channels-last outputs, got strides {[g.stride() for g in got]}"
    problems = [f"output {i}: {p}" for i, (g, w) in enumerate(zip(got, want))
                if (p := compare(g.cpu(), w, c.rtol.get(DType.from_torch(w.dtype)))) is not None]
    if len(got) != len(want):
        problems.append(f"{len(got)} outputs, want {len(want)}")
    for i, (x, b) in enumerate(zip(xs, before)):
        if i != c.alias and not torch.equal(x.nan_to_num(), b.nan_to_num()):
            problems.append(f"input {i} was modified")
    return "; ".join(problems) or None


def _two_outputs(r: Inputs) -> Case:
    """An NCHW input, two outputs (a ReLU and its negation), both asked channels-last."""
    g = Graph("case")
    x = g.add_input("x", TensorType(F32, (2, 4, 3, 5)))
    y = g.add("Relu", [x])[0]
    g.outputs = [y, g.add("Neg", [y])[0]]
    return Case(g, [r.randn(2, 4, 3, 5)])


# --- QuantizeLinear (per tensor: int8 outputs of the requantizing epilogues) --------------------------------------

case("QuantizeLinear-float32-int8-saturating")(lambda r: op_case("QuantizeLinear", [
    r.randn(*SHAPE, scale=60.0), torch.tensor(0.37), torch.tensor(-3, dtype=torch.int8)]))
case("QuantizeLinear-float16-scale-uint8")(lambda r: op_case("QuantizeLinear", [
    r.randn(*SHAPE, dtype=F16, scale=4.0), torch.tensor(0.05, dtype=torch.float16),
    torch.tensor(128, dtype=torch.uint8)]))
case("QuantizeLinear-ties-no-zero-point")(lambda r: op_case("QuantizeLinear", [
    r.halves(*SHAPE) * 3, torch.tensor(1.0)]))
case("QuantizeLinear-ties-int8-zero-point-extremes")(lambda r: op_case("QuantizeLinear", [
    _extremes(r.halves(*SHAPE) * 40), torch.tensor(1.0), torch.tensor(5, dtype=torch.int8)]))
case("QuantizeLinear-ties-uint8-high-zero-point")(lambda r: op_case("QuantizeLinear", [
    _extremes(r.halves(*SHAPE) * 3), torch.tensor(0.5), torch.tensor(250, dtype=torch.uint8)]))
case("QuantizeLinear-constant-zero-point")(lambda r: _quantize_constant_zero(r))
case("QuantizeLinear-constant-subnormal-scale")(lambda r: _quantize_constant_scale(r, 1e-39))


def _quantize_constant_scale(r: Inputs, scale: float) -> Case:
    """A constant float32 scale baked into the source; 1e-39 (subnormal): its reciprocal overflows float32, so the
    generator divides per value instead of correcting the product with the reciprocal (`km.quotient`)."""
    x = r.randn(*SHAPE, scale=scale * 60.0)
    g, (vx,) = graph((D.FLOAT32, x.shape))
    sc = g.add_initializer("scale", torch.tensor(scale, dtype=torch.float32))
    g.outputs = list(g.add("QuantizeLinear", [vx, sc, g.add_initializer("zp", torch.tensor(0, dtype=torch.int8))],
                           {}))
    return Case(g, [x])


def _extremes(x: torch.Tensor) -> torch.Tensor:
    """x with the values that saturate or sit on a rounding tie at the range's ends."""
    x.view(-1)[:8] = torch.tensor([INF, -INF, 3e38, -3e38, 127.5, -128.5, 255.5, -0.5], dtype=x.dtype)
    return x


def _quantize_constant_zero(r: Inputs) -> Case:
    """The zero point a constant 0 (kiln's own symmetric quantization): the generator bakes it in."""
    x = _extremes(r.halves(*SHAPE, dtype=D.FLOAT16) * 30)
    g, (vx,) = graph((D.FLOAT16, x.shape))
    zp = g.add_initializer("zp", torch.tensor(0, dtype=torch.int8))
    sc = g.add_initializer("scale", torch.tensor(0.25, dtype=torch.float16))
    g.outputs = list(g.add("QuantizeLinear", [vx, sc, zp], {}))
    return Case(g, [x])

# --- DequantizeLinear (per tensor: an int8 operand of a quantized layer's epilogue, the residual's int8 copy) -----

case("DequantizeLinear-int8-float16-scale")(lambda r: op_case("DequantizeLinear", [
    r.ints(-128, 128, *SHAPE, dtype=D.INT8), torch.tensor(0.0371, dtype=torch.float16),
    torch.tensor(-5, dtype=torch.int8)]))
case("DequantizeLinear-uint8-float32-scale")(lambda r: op_case("DequantizeLinear", [
    r.ints(0, 256, *SHAPE, dtype=D.UINT8), torch.tensor(0.013), torch.tensor(200, dtype=torch.uint8)]))
case("DequantizeLinear-int8-then-add")(lambda r: _dq_add(r))


def _dq_add(r: Inputs) -> Case:
    """The residual as a quantized layer's epilogue reads it: float16 result + the dequantized int8 identity."""
    xq, s, y = r.ints(-128, 128, *SHAPE, dtype=D.INT8), torch.tensor(0.0213, dtype=torch.float16), \
        r.randn(*SHAPE, dtype=D.FLOAT16, scale=3.0)
    g, (vq, vs, vy) = graph((D.INT8, xq.shape), (D.FLOAT16, ()), (D.FLOAT16, y.shape))
    (d,) = g.add("DequantizeLinear", [vq, vs], {})
    (a,) = g.add("Add", [vy, d])
    (o,) = g.add("Relu", [a])
    g.outputs = [o]
    return Case(g, [xq, s, y])
