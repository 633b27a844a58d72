"""Op table entries: tensor creation, shape manipulation and indexing.

These ops carry most of a model's shape logic, so their inference works on symbolic dims and reads shape
tensors through `shape_values`, which follows shape arithmetic (Shape -> Gather -> Concat -> Reshape) back to
the dims it came from. References run on torch; dtypes torch's CPU kernels lack are moved as same-width
integers (`_bits`), compared through an order-preserving key (`_order_key`) or computed wider (`_arith`), and
string tensors run as int64 codes that sort like the strings (`_with_strings`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Node, Shape, TensorType, Value
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, broadcast_shapes, const_value, register

Dims = list[sym.Dim]
RefFn = Callable[[RefCtx, list[Any]], Sequence[Any]]
I64 = DType.INT64
_A = AttrKind


# --- Constant -----------------------------------------------------------------------------------------


def _constant_infer(ctx: InferCtx) -> list[TensorType]:
    v = ctx.attrs["value"]
    if isinstance(v, np.ndarray):
        return [TensorType(DType.STRING, tuple(v.shape))]
    dtype = ctx.attrs["dtype"] or DType.from_torch(v.dtype)
    return [TensorType(dtype, tuple(v.shape))]


def _constant_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    return [c.attrs["value"]]


register(
    "Constant", inputs=[], outputs=["output"], infer=_constant_infer, ref=_constant_ref,
    attrs={"value": Attr(AttrKind.TENSOR),
           "dtype": Attr(AttrKind.DTYPE, None, doc="set for narrow types stored widened (int4, ...)")},
    doc="A constant tensor (the ONNX value_* attribute forms are all normalized to `value`).",
)


# --- storage helpers ----------------------------------------------------------------------------------

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)
_UNSIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_SAME_WIDTH = {**_UNSIGNED, **{f: torch.int8 for f in _FLOAT8}}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t as a same-width integer where torch's CPU kernels lack its dtype (for ops that only move data)."""
    v = _SAME_WIDTH.get(t.dtype)
    return t if v is None else t.view(v)


def _unbits(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.view(dtype)


def _take(x: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """index_select for every dtype."""
    return _unbits(_bits(x).index_select(axis, idx), x.dtype)


def _order_key(t: torch.Tensor) -> torch.Tensor:
    """A tensor that compares and sorts like t, in a dtype torch's CPU kernels support."""
    if t.dtype in _UNSIGNED:
        s = _UNSIGNED[t.dtype]
        return t.view(s) ^ torch.iinfo(s).min  # flipping the sign bit keeps unsigned order
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.dtype in _FLOAT8:
        return t.float()
    return t


Back = Callable[[torch.Tensor], torch.Tensor]


def _arith(t: torch.Tensor, ordered: bool = False) -> tuple[torch.Tensor, Back]:
    """t in a dtype torch can add/multiply (or, with `ordered`, take max/min of), and the way back."""
    dt = t.dtype
    if dt in _UNSIGNED:
        if ordered:
            flip = torch.iinfo(_UNSIGNED[dt]).min
            return _order_key(t), lambda r: (r ^ flip).view(dt)
        return t.view(_UNSIGNED[dt]), lambda r: r.view(dt)  # two's complement wraps like unsigned
    if dt == torch.bool:  # add is or, mul is and; int32 so that many trues cannot wrap to zero
        return t.to(torch.int32), lambda r: r != 0
    if dt in _FLOAT8:
        return t.float(), lambda r: r.to(dt)
    return t, lambda r: r


def _with_strings(ref: RefFn, ins: Sequence[int] | None = (0,), outs: Sequence[int] | None = (0,)) -> RefFn:
    """Run `ref` on string tensors: inputs `ins` (None: all) become int64 codes that sort like the strings
    ('' is code 0, so a zero fill reads as ''); outputs `outs` (None: all) are mapped back to strings."""

    def run(c: RefCtx, xs: list[Any]) -> Sequence[Any]:
        pos = range(len(xs)) if ins is None else [i for i in ins if i < len(xs)]
        strings = [i for i in pos if isinstance(xs[i], np.ndarray)]
        if not strings:
            return ref(c, xs)
        flat = [np.array([""], dtype=object)] + [xs[i].reshape(-1) for i in strings]
        table, codes = np.unique(np.concatenate(flat), return_inverse=True)
        # The codes go where the other (numeric) inputs are, as the op's own inputs would be.
        device = next((x.device for x in xs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        xs, at = list(xs), 1
        for i in strings:
            a = xs[i]
            code = torch.from_numpy(codes.reshape(-1)[at:at + a.size].astype(np.int64)).reshape(a.shape)
            xs[i] = code.to(device)
            at += a.size
        res = list(ref(c, xs))
        for o in range(len(res)) if outs is None else outs:
            if o < len(res) and isinstance(res[o], torch.Tensor):
                idx = res[o].cpu().numpy()
                res[o] = np.asarray(table[idx.reshape(-1)], dtype=object).reshape(idx.shape)
        return res

    return run


def _ints(t: Any) -> list[Any]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _wrap_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Negative indices count from the end; anything still out of [0, size) is an error."""
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + size, idx)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise IndexError(f"index out of range for a dim of size {size}")
    return idx


# --- symbolic helpers ---------------------------------------------------------------------------------


def _smin(a: sym.Dim, b: sym.Dim) -> sym.Dim:
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    import sympy

    return sym._from_sym(sympy.Min(sym._to_sym(a), sym._to_sym(b)))


def _smax(a: sym.Dim, b: sym.Dim) -> sym.Dim:
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    import sympy

    return sym._from_sym(sympy.Max(sym._to_sym(a), sym._to_sym(b)))


_MAX_VALUES = 1024
_MAX_DEPTH = 64


def shape_values(v: Value | None) -> Dims | None:
    """The elements of a 0-D or 1-D integer tensor as dims, when inference can tell: constants, and shape
    arithmetic on Shape/Size outputs (Gather, Slice, Concat, Squeeze/Unsqueeze/Reshape/Flatten, Cast,
    Identity, Add/Sub/Mul/Div, ConstantOfShape, Where on Equal). None when unknown."""
    return _values(v, 0)


def _values(v: Value | None, depth: int) -> Dims | None:
    if v is None or depth > _MAX_DEPTH or not isinstance(v.type, TensorType) or not v.type.dtype.is_int:
        return None
    if v.type.rank is not None and v.type.rank > 1:
        return None
    c = const_value(v)
    if isinstance(c, torch.Tensor):
        return list(_ints(c)) if c.dim() <= 1 and c.numel() <= _MAX_VALUES else None
    p = v.producer
    rule = _VALUE_RULES.get(p.op) if p is not None else None
    if p is None or rule is None:
        return None
    try:
        return rule(p, depth + 1)
    except (ValueError, IndexError, TypeError, ZeroDivisionError):
        return None


def _is_vector(v: Value, scalar: bool = False) -> bool:
    t = v.type
    return isinstance(t, TensorType) and (t.rank == 1 or (scalar and t.rank == 0))


def _v_shape(p: Node, depth: int) -> Dims | None:
    x = p.inputs[0]
    if x is None or not isinstance(x.type, TensorType) or x.type.shape is None:
        return None
    s, e = _shape_bounds(len(x.type.shape), p.attrs.get("start", 0), p.attrs.get("end"))
    return list(x.type.shape[s:e])


def _v_size(p: Node, depth: int) -> Dims | None:
    x = p.inputs[0]
    if x is None or not isinstance(x.type, TensorType) or x.type.shape is None:
        return None
    return [sym.prod(x.type.shape)]


def _v_same(p: Node, depth: int) -> Dims | None:
    src = p.inputs[0]
    if src is None or not isinstance(src.type, TensorType) or not src.type.dtype.is_int:
        return None
    return _values(src, depth)


def _v_concat(p: Node, depth: int) -> Dims | None:
    out: Dims = []
    for x in p.inputs:
        part = _values(x, depth)
        if part is None:
            return None
        out.extend(part)
    return out


def _v_gather(p: Node, depth: int) -> Dims | None:
    data, idx = p.inputs[0], p.inputs[1]
    if data is None or not _is_vector(data) or p.attrs.get("axis", 0) not in (0, -1):
        return None
    vals, where = _values(data, depth), _values(idx, depth)
    if vals is None or where is None or not all(isinstance(i, int) for i in where):
        return None
    return [vals[int(i)] for i in where]


def _v_slice(p: Node, depth: int) -> Dims | None:
    vals = _values(p.inputs[0], depth)
    parts = [_values(x, depth) if x is not None else None for x in p.inputs[1:5]] + [None] * 4
    starts, ends, axes, steps = parts[:4]
    if vals is None or starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    if axes is not None and axes not in ([0], [-1]):
        return None
    step = steps[0] if steps is not None else 1
    if not all(isinstance(x, int) for x in (starts[0], ends[0], step)) or step == 0:
        return None
    return vals[slice(*slice(starts[0], ends[0], step).indices(len(vals)))]


def _v_arith(p: Node, depth: int) -> Dims | None:
    a, b = _values(p.inputs[0], depth), _values(p.inputs[1], depth)
    if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
        return None
    n = max(len(a), len(b))
    a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
    return [_dim_arith(p.op, x, y) for x, y in zip(a, b)]


def _dim_arith(op: str, x: sym.Dim, y: sym.Dim) -> sym.Dim:
    if op == "Add":
        return sym.add(x, y)
    if op == "Sub":
        return sym.sub(x, y)
    if op == "Mul":
        return sym.mul(x, y)
    if isinstance(x, int) and isinstance(y, int):
        return int(x / y) if abs(x) < 2**52 and abs(y) < 2**52 else x // y  # integer Div truncates
    return sym.floordiv(x, y)  # symbolic dims are positive: floor and truncation agree


def _v_reshaped(p: Node, depth: int) -> Dims | None:
    if not _is_vector(p.outputs[0], scalar=True):
        return None
    return _v_same(p, depth)


def _v_constant_of_shape(p: Node, depth: int) -> Dims | None:
    n, value = _values(p.inputs[0], depth), p.attrs.get("value")
    if n is None or len(n) != 1 or not isinstance(n[0], int) or n[0] > _MAX_VALUES:
        return None
    if value is None:
        return [0] * n[0]
    return [int(value.reshape(-1)[0])] * n[0] if isinstance(value, torch.Tensor) else None


def _v_where(p: Node, depth: int) -> Dims | None:
    """Where(Equal(shape, -1), 1, shape): how exporters spell "keep these dims" for Expand."""
    cond, a, b = _bools(p.inputs[0], depth), _values(p.inputs[1], depth), _values(p.inputs[2], depth)
    if cond is None or a is None or b is None:
        return None
    n = max(len(cond), len(a), len(b))
    if any(len(v) not in (1, n) for v in (cond, a, b)):
        return None
    pick = [(cond * n if len(cond) == 1 else cond)[i] for i in range(n)]
    a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
    return [x if c else y for c, x, y in zip(pick, a, b)]


def _bools(v: Value | None, depth: int) -> list[bool] | None:
    """Elements of a small bool tensor: a constant, or Equal of two known dim lists when decidable."""
    if v is None or not isinstance(v.type, TensorType) or v.type.dtype is not DType.BOOL:
        return None
    c = const_value(v)
    if isinstance(c, torch.Tensor):
        small = c.dim() <= 1 and c.numel() <= _MAX_VALUES
        return [bool(x) for x in c.reshape(-1).tolist()] if small else None
    p = v.producer
    if p is None or p.op != "Equal":
        return None
    a, b = _values(p.inputs[0], depth + 1), _values(p.inputs[1], depth + 1)
    if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
        return None
    n = max(len(a), len(b))
    eq = [_dims_equal(x, y) for x, y in zip(a * n if len(a) == 1 else a, b * n if len(b) == 1 else b)]
    return None if any(e is None for e in eq) else [bool(e) for e in eq]


def _dims_equal(a: sym.Dim, b: sym.Dim) -> bool | None:
    """Decide a == b where symbols are positive integers (so seq == -1 is false); None when unknown."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    z = sym._to_sym(sym.sub(a, b))
    return None if z.is_zero is None else bool(z.is_zero)


_VALUE_RULES: dict[str, Callable[[Node, int], Dims | None]] = {
    "Shape": _v_shape, "Size": _v_size, "Identity": _v_same, "Cast": _v_same, "Concat": _v_concat,
    "Gather": _v_gather, "Slice": _v_slice, "Add": _v_arith, "Sub": _v_arith, "Mul": _v_arith,
    "Div": _v_arith, "Squeeze": _v_reshaped, "Unsqueeze": _v_reshaped, "Reshape": _v_reshaped,
    "Flatten": _v_reshaped, "ConstantOfShape": _v_constant_of_shape, "Where": _v_where,
}


def _vector_len(ctx: InferCtx, i: int) -> int | None:
    """The static length of a 1-D input (1 for a scalar), or None."""
    s = ctx.shape(i)
    if s is None:
        return None
    if len(s) == 0:
        return 1
    return s[0] if len(s) == 1 and isinstance(s[0], int) else None


def _int_input(ctx: InferCtx, i: int, what: str) -> None:
    if ctx.has(i) and not ctx.dtype(i).is_int:
        raise ctx.error(f"{what} (input {i}) must be an integer tensor, got {ctx.dtype(i)}")


def _axis(ctx: InferCtx, rank: int | None, name: str = "axis", extra: int = 0) -> int | None:
    a = ctx.attrs[name]
    if rank is None:
        return None
    return ctx.axis(a, rank, extra=extra)


def _static_axes(ctx: InferCtx, axes: Sequence[int], rank: int) -> list[int]:
    out = [ctx.axis(a, rank) for a in axes]
    if len(set(out)) != len(out):
        raise ctx.error(f"axes {list(axes)} repeat an axis")
    return out


def _t(dtype: DType, shape: Sequence[sym.Dim] | None) -> TensorType:
    return TensorType(dtype, None if shape is None else tuple(shape))


# --- Shape, Size --------------------------------------------------------------------------------------


def _shape_bounds(rank: int, start: int, end: int | None) -> tuple[int, int]:
    s, e = slice(start, end).indices(rank)[:2]
    return s, max(s, e)


def _shape_infer(ctx: InferCtx) -> list[TensorType]:
    r = ctx.rank(0)
    if r is None:
        return [_t(I64, (ctx.fresh("rank"),))]
    s, e = _shape_bounds(r, ctx.attrs["start"], ctx.attrs["end"])
    return [_t(I64, (e - s,))]


def _shape_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    s, e = _shape_bounds(len(xs[0].shape), c.attrs["start"], c.attrs["end"])
    return [torch.tensor(list(xs[0].shape)[s:e], dtype=torch.int64)]


register(
    "Shape", inputs=["data"], outputs=["shape"], infer=_shape_infer, ref=_shape_ref,
    attrs={"start": Attr(_A.INT, 0), "end": Attr(_A.INT, None)},
    doc="The input's shape as int64, dims [start, end) (negative counts from the back, clamped).",
)

register(
    "Size", inputs=["data"], outputs=["size"], infer=lambda ctx: [_t(I64, ())],
    ref=lambda c, xs: [torch.tensor(math.prod(xs[0].shape), dtype=torch.int64)],
    doc="The input's element count as an int64 scalar.",
)


# --- Reshape, Flatten, Squeeze, Unsqueeze, Transpose ---------------------------------------------------


def _reshape_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "shape")
    x = ctx.tensor(0)
    dims = shape_values(ctx.value(1))
    if dims is None:
        return [_t(x.dtype, ctx.fresh_shape(_vector_len(ctx, 1)))]
    return [_t(x.dtype, _reshape_dims(ctx, x.shape, dims, bool(ctx.attrs["allowzero"])))]


def _reshape_dims(ctx: InferCtx, src: Shape | None, dims: Dims, allowzero: bool) -> Dims | None:
    out: Dims = []
    for i, d in enumerate(dims):
        if d == 0 and not allowzero:
            if src is not None and i >= len(src):
                raise ctx.error(f"shape[{i}] is 0 (copy the input dim) but the input has rank {len(src)}")
            out.append(src[i] if src is not None else ctx.fresh())
        elif isinstance(d, int) and d < -1:
            raise ctx.error(f"shape[{i}] = {d} is invalid")
        else:
            out.append(d)
    holes = [i for i, d in enumerate(out) if d == -1]
    if len(holes) > 1:
        raise ctx.error(f"shape {dims} has more than one -1")
    if allowzero and holes and 0 in out:
        raise ctx.error(f"shape {dims} has both 0 and -1 with allowzero=1")
    if src is None:
        return [ctx.fresh() if d == -1 else d for d in out]
    total = sym.prod(src)
    if holes:
        known = sym.prod(d for d in out if d != -1)
        out[holes[0]] = _solve_hole(ctx, total, known, dims)
    elif sym.equal(sym.prod(out), total) is False:
        raise ctx.error(f"cannot reshape {list(src)} to {dims}: element counts differ")
    return out


def _solve_hole(ctx: InferCtx, total: sym.Dim, known: sym.Dim, dims: Dims) -> sym.Dim:
    if isinstance(total, int) and isinstance(known, int):
        if known == 0 or total % known:
            if known == 0 and total == 0:
                raise ctx.error(f"shape {dims}: -1 is ambiguous for an empty tensor")
            raise ctx.error(f"cannot reshape {total} elements to {dims}")
        return total // known
    if known == 0:
        raise ctx.error(f"shape {dims}: -1 next to a 0 dim is ambiguous")
    return sym.floordiv(total, known)


def _reshape_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, dims = xs[0], _ints(xs[1])
    if not c.attrs["allowzero"]:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return [x.reshape(dims)]


register(
    "Reshape", inputs=["data", "shape"], outputs=["reshaped"], infer=_reshape_infer,
    ref=_with_strings(_reshape_ref), attrs={"allowzero": Attr(_A.INT, 0, choices=(0, 1))},
    doc="Reshape; a 0 in `shape` copies the input dim (unless allowzero=1) and one -1 is inferred.",
)


def _flatten_infer(ctx: InferCtx) -> list[TensorType]:
    x = ctx.tensor(0)
    if x.shape is None:
        return [_t(x.dtype, (ctx.fresh(), ctx.fresh()))]
    try:
        a = _flatten_axis(ctx.attrs["axis"], len(x.shape))
    except ValueError as e:
        raise ctx.error(str(e)) from None
    return [_t(x.dtype, (sym.prod(x.shape[:a]), sym.prod(x.shape[a:])))]


def _flatten_axis(axis: int, rank: int) -> int:
    """Flatten's axis lies in [-rank, rank]; a negative one counts from the back."""
    if not -rank <= axis <= rank:
        raise ValueError(f"axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _flatten_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    a = _flatten_axis(c.attrs["axis"], x.dim())
    return [x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))]


register(
    "Flatten", inputs=["input"], outputs=["output"], infer=_flatten_infer, ref=_with_strings(_flatten_ref),
    attrs={"axis": Attr(_A.INT, 1)}, doc="Reshape to 2-D: [prod(dims[:axis]), prod(dims[axis:])].",
)


def _squeeze_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "axes")
    x = ctx.tensor(0)
    if not ctx.has(1):
        if x.shape is None or not all(isinstance(d, int) for d in x.shape):
            return [_t(x.dtype, None)]  # which symbolic dims are 1 is unknown
        return [_t(x.dtype, [d for d in x.shape if d != 1])]
    axes = ctx.const_ints(1)
    if x.shape is None:
        return [_t(x.dtype, None)]
    if axes is None:
        n = _vector_len(ctx, 1)
        return [_t(x.dtype, None if n is None else ctx.fresh_shape(len(x.shape) - n))]
    drop = _static_axes(ctx, axes, len(x.shape))
    for a in drop:
        if isinstance(x.shape[a], int) and x.shape[a] != 1:
            raise ctx.error(f"cannot squeeze axis {a} of size {x.shape[a]}")
    return [_t(x.dtype, [d for i, d in enumerate(x.shape) if i not in drop])]


def _squeeze_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    if len(xs) < 2 or xs[1] is None:
        return [x.reshape([d for d in x.shape if d != 1])]
    drop = {_norm_axis(a, x.dim(), "axes value") for a in _ints(xs[1])}
    for a in drop:
        if x.shape[a] != 1:
            raise ValueError(f"cannot squeeze axis {a} of size {x.shape[a]}")
    return [x.reshape([d for i, d in enumerate(x.shape) if i not in drop])]


register(
    "Squeeze", inputs=["data", "axes?"], outputs=["squeezed"], infer=_squeeze_infer,
    ref=_with_strings(_squeeze_ref), doc="Remove size-1 dims (`axes`, or all of them).",
)


def _unsqueeze_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "axes")
    x = ctx.tensor(0)
    axes = ctx.const_ints(1)
    if x.shape is None:
        return [_t(x.dtype, None)]
    if axes is None:
        n = _vector_len(ctx, 1)
        return [_t(x.dtype, None if n is None else ctx.fresh_shape(len(x.shape) + n))]
    r = len(x.shape) + len(axes)
    ins = [ctx.axis(a, r) for a in axes]
    if len(set(ins)) != len(ins):
        raise ctx.error(f"axes {axes} repeat an axis")
    return [_t(x.dtype, _unsqueezed(x.shape, ins))]


def _unsqueezed(shape: Sequence[Any], ins: Sequence[int]) -> list[Any]:
    rest = iter(shape)
    return [1 if i in ins else next(rest) for i in range(len(shape) + len(ins))]


def _unsqueeze_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, axes = xs[0], _ints(xs[1])
    r = x.dim() + len(axes)
    ins = {_norm_axis(a, r, "axes value") for a in axes}
    if len(ins) != len(axes):
        raise ValueError(f"axes {axes} repeat an axis")
    return [x.reshape(_unsqueezed(x.shape, sorted(ins)))]


register(
    "Unsqueeze", inputs=["data", "axes"], outputs=["expanded"], infer=_unsqueeze_infer,
    ref=_with_strings(_unsqueeze_ref), doc="Insert size-1 dims at `axes` (positions in the output).",
)


def _perm(ctx_perm: tuple[int, ...] | None, rank: int) -> list[int]:
    if ctx_perm is None:
        return list(range(rank))[::-1]
    perm = [p + rank if p < 0 else p for p in ctx_perm]
    if sorted(perm) != list(range(rank)):
        raise ValueError(f"perm {list(ctx_perm)} is not a permutation of {rank} axes")
    return perm


def _transpose_infer(ctx: InferCtx) -> list[TensorType]:
    x = ctx.tensor(0)
    p = ctx.attrs["perm"]
    if x.shape is None:
        return [_t(x.dtype, None if p is None else ctx.fresh_shape(len(p)))]
    try:
        perm = _perm(p, len(x.shape))
    except ValueError as e:
        raise ctx.error(str(e)) from None
    return [_t(x.dtype, [x.shape[i] for i in perm])]


def _transpose_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    return [xs[0].permute(_perm(c.attrs["perm"], xs[0].dim())).contiguous()]


register(
    "Transpose", inputs=["data"], outputs=["transposed"], infer=_transpose_infer,
    ref=_with_strings(_transpose_ref), attrs={"perm": Attr(_A.INTS, None)},
    doc="Permute axes (default: reverse them).",
)


# --- Concat, Split ------------------------------------------------------------------------------------


def _concat_infer(ctx: InferCtx) -> list[TensorType]:
    shapes = [ctx.shape(i) for i in range(ctx.n_inputs)]
    dtypes = {ctx.dtype(i) for i in range(ctx.n_inputs)}
    if len(dtypes) > 1:
        raise ctx.error(f"inputs have different dtypes: {', '.join(sorted(map(str, dtypes)))}")
    known = [s for s in shapes if s is not None]
    if not known:
        return [_t(ctx.dtype(0), None)]
    r = len(known[0])
    if any(len(s) != r for s in known):
        raise ctx.error(f"inputs have different ranks: {[list(s) for s in known]}")
    a = ctx.axis(ctx.attrs["axis"], r)
    out: Dims = []
    for i in range(r):
        if i == a:
            out.append(_concat_len(ctx, shapes, a))
        else:
            out.append(_same_dim(ctx, [s[i] for s in known], i))
    return [_t(ctx.dtype(0), out)]


def _concat_len(ctx: InferCtx, shapes: list[Shape | None], a: int) -> sym.Dim:
    if any(s is None for s in shapes):
        return ctx.fresh()
    total: sym.Dim = 0
    for s in shapes:
        assert s is not None
        total = sym.add(total, s[a])
    return total


def _same_dim(ctx: InferCtx, dims: Sequence[sym.Dim], axis: int) -> sym.Dim:
    static = {d for d in dims if isinstance(d, int)}
    if len(static) > 1:
        raise ctx.error(f"inputs differ in dim {axis}: {', '.join(map(str, dims))}")
    return static.pop() if static else dims[0]


def _concat_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    a = _norm_axis(c.attrs["axis"], xs[0].dim())
    return [torch.cat(list(xs), a)]


register(
    "Concat", inputs=["inputs+"], outputs=["concat_result"], infer=_concat_infer,
    ref=_with_strings(_concat_ref, ins=None), attrs={"axis": Attr(_A.INT)},
    doc="Concatenate along `axis`.",
)


def _even_split(d: Any, n: int) -> list[Any]:
    """ONNX's split into n parts: equal chunks of ceil(d/n), the last one smaller."""
    chunk = sym.ceildiv(d, n)
    last = sym.sub(d, sym.mul(chunk, n - 1))
    if isinstance(last, int) and last < 0:
        raise ValueError(f"a dim of {d} cannot be split into {n} parts")
    return [chunk] * (n - 1) + [last]


def _split_count(attrs: dict[str, Any], n_outputs: int) -> int:
    n = attrs["num_outputs"]
    if n is not None and n != n_outputs:
        raise ValueError(f"num_outputs={n} but the node has {n_outputs} outputs")
    return n_outputs


def _split_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "split")
    x = ctx.tensor(0)
    n = ctx.n_outputs
    if ctx.has(1) and ctx.attrs["num_outputs"] is not None:
        raise ctx.error("give either the split input or num_outputs, not both")
    if x.shape is None:
        return [_t(x.dtype, None)] * n
    a = ctx.axis(ctx.attrs["axis"], len(x.shape))
    d = x.shape[a]
    try:
        sizes = _split_sizes(ctx, d, n)
    except ValueError as e:
        raise ctx.error(str(e)) from None
    return [_t(x.dtype, (*x.shape[:a], s, *x.shape[a + 1:])) for s in sizes]


def _split_sizes(ctx: InferCtx, d: sym.Dim, n: int) -> list[sym.Dim]:
    if not ctx.has(1):
        parts = _split_count(ctx.attrs, n)
        try:
            return _even_split(d, parts)
        except ValueError:  # fails when run; may be an untaken If branch, so not an error here
            return [ctx.fresh() for _ in range(n)]
    sizes = shape_values(ctx.value(1))
    if sizes is None:
        return [ctx.fresh() for _ in range(n)]
    if len(sizes) != n:
        raise ValueError(f"split has {len(sizes)} entries but the node has {n} outputs")
    if any(isinstance(s, int) and s < 0 for s in sizes):
        raise ValueError(f"split {sizes} has a negative size")
    if sym.equal(_sum(sizes), d) is False:
        raise ValueError(f"split {sizes} does not add up to the dim {d}")
    return sizes


def _sum(dims: Sequence[sym.Dim]) -> sym.Dim:
    total: sym.Dim = 0
    for d in dims:
        total = sym.add(total, d)
    return total


def _split_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    a = _norm_axis(c.attrs["axis"], x.dim())
    if len(xs) > 1 and xs[1] is not None:
        sizes = _ints(xs[1])
        if len(sizes) != c.n_outputs or sum(sizes) != x.shape[a] or min(sizes, default=0) < 0:
            raise ValueError(f"split {sizes} does not fit a dim of {x.shape[a]} into {c.n_outputs} outputs")
    else:
        sizes = _even_split(x.shape[a], _split_count(c.attrs, c.n_outputs))
    return list(torch.split(x, sizes, a))


register(
    "Split", inputs=["input", "split?"], outputs=["outputs+"], infer=_split_infer,
    ref=_with_strings(_split_ref, outs=None),
    attrs={"axis": Attr(_A.INT, 0), "num_outputs": Attr(_A.INT, None)},
    doc="Split along `axis` by the sizes in `split`, or into equal parts (the last one smaller).",
)


# --- Slice --------------------------------------------------------------------------------------------

_BIG = 2**31 - 1
"""Slice bounds at least this large mean "to the end": symbolic dims are assumed smaller."""


def _sign(d: sym.Dim) -> int | None:
    if isinstance(d, int):
        return -1 if d < 0 else 1
    e = sym._to_sym(d)
    return 1 if e.is_nonnegative else -1 if e.is_negative else None


def _slice_len(d: sym.Dim, s: sym.Dim, e: sym.Dim, st: int) -> sym.Dim | None:
    """Elements in d[s:e:st] with ONNX's clamping; None when it depends on unknown signs."""
    if isinstance(d, int) and isinstance(s, int) and isinstance(e, int):
        return len(range(*slice(s, e, st).indices(d)))
    ss, es = _sign(s), _sign(e)
    if ss is None or es is None:
        return None
    if st > 0:
        b = _clamp_bound(d, s, ss, 0, d, low_end=True)
        f = _clamp_bound(d, e, es, 0, d, low_end=False)
        return _smax(0, sym.ceildiv(sym.sub(f, b), st))
    last = sym.sub(d, 1)
    b = _clamp_bound(d, s, ss, -1, last, low_end=False)
    f = _clamp_bound(d, e, es, -1, last, low_end=True)
    return _smax(0, sym.ceildiv(sym.sub(b, f), -st))


def _clamp_bound(d: sym.Dim, v: sym.Dim, sign: int, lo: sym.Dim, hi: sym.Dim, *, low_end: bool) -> sym.Dim:
    if isinstance(v, int) and v >= _BIG:
        return hi
    if isinstance(v, int) and v <= -_BIG:
        return lo
    if sign < 0:
        return _smax(lo, sym.add(d, v))
    return _smin(v, hi)


def _slice_infer(ctx: InferCtx) -> list[TensorType]:
    for i, what in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps")):
        _int_input(ctx, i, what)
    x = ctx.tensor(0)
    if x.shape is None:
        return [_t(x.dtype, None)]
    r = len(x.shape)
    starts, ends = shape_values(ctx.value(1)), shape_values(ctx.value(2))
    steps = shape_values(ctx.value(4)) if ctx.has(4) else None
    n = len(starts) if starts is not None else _vector_len(ctx, 1)
    axes = ctx.const_ints(3) if ctx.has(3) else (list(range(n)) if n is not None else None)
    if axes is None:
        return [_t(x.dtype, ctx.fresh_shape(r))]
    axes = _static_axes(ctx, axes, r)
    for name, vals in (("starts", starts), ("ends", ends), ("steps", steps)):
        if vals is not None and len(vals) != len(axes):
            raise ctx.error(f"{name} has {len(vals)} entries for {len(axes)} axes")
    out = list(x.shape)
    for j, a in enumerate(axes):
        st = steps[j] if steps is not None else (1 if not ctx.has(4) else None)
        if st == 0:
            raise ctx.error("slice step cannot be 0")
        n_a = None
        if starts is not None and ends is not None and isinstance(st, int):
            n_a = _slice_len(x.shape[a], starts[j], ends[j], st)
        out[a] = n_a if n_a is not None else ctx.fresh()
    return [_t(x.dtype, out)]


def _slice_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, starts, ends = xs[0], _ints(xs[1]), _ints(xs[2])
    axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
    steps = _ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("starts, ends, axes and steps differ in length")
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _norm_axis(a, x.dim(), "axes value")
        if st == 0:
            raise ValueError("slice step cannot be 0")
        b, f, st = slice(s, e, st).indices(x.shape[a])
        if st > 0:
            x = x[(slice(None),) * a + (slice(b, f, st),)]
        else:
            x = _take(x, a, torch.arange(b, f, st, dtype=torch.int64, device=x.device))
    return [x]


register(
    "Slice", inputs=["data", "starts", "ends", "axes?", "steps?"], outputs=["output"], infer=_slice_infer,
    ref=_with_strings(_slice_ref), doc="numpy-style slicing; out-of-range starts/ends are clamped.",
)


# --- Gather family ------------------------------------------------------------------------------------


def _gather_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "indices")
    x, idx = ctx.tensor(0), ctx.tensor(1)
    if x.shape is None or idx.shape is None:
        return [_t(x.dtype, None)]
    a = ctx.axis(ctx.attrs["axis"], len(x.shape))
    return [_t(x.dtype, x.shape[:a] + idx.shape + x.shape[a + 1:])]


def _gather_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, idx = xs
    a = _norm_axis(c.attrs["axis"], x.dim())
    i = _wrap_index(idx, x.shape[a])
    out = _take(x, a, i.reshape(-1))
    return [out.reshape(x.shape[:a] + i.shape + x.shape[a + 1:])]


register(
    "Gather", inputs=["data", "indices"], outputs=["output"], infer=_gather_infer,
    ref=_with_strings(_gather_ref), attrs={"axis": Attr(_A.INT, 0)},
    doc="Take slices along `axis` at `indices` (negative indices count from the back).",
)


def _gather_elements_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "indices")
    x, idx = ctx.tensor(0), ctx.tensor(1)
    if x.rank is not None and idx.rank is not None and x.rank != idx.rank:
        raise ctx.error(f"data has rank {x.rank} but indices rank {idx.rank}")
    _axis(ctx, x.rank if x.rank is not None else idx.rank)
    return [_t(x.dtype, idx.shape)]


def _gather_elements_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, idx = xs
    a = _norm_axis(c.attrs["axis"], x.dim())
    return [_unbits(torch.gather(_bits(x), a, _wrap_index(idx, x.shape[a])), x.dtype)]


register(
    "GatherElements", inputs=["data", "indices"], outputs=["output"], infer=_gather_elements_infer,
    ref=_with_strings(_gather_elements_ref), attrs={"axis": Attr(_A.INT, 0)},
    doc="out[i][j][k] = data[indices[i][j][k]][j][k] (for axis 0), like torch.gather.",
)


def _gathernd_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "indices")
    x, idx = ctx.tensor(0), ctx.tensor(1)
    b = ctx.attrs["batch_dims"]
    if x.shape is None or idx.shape is None or not idx.shape or not isinstance(idx.shape[-1], int):
        return [_t(x.dtype, None)]
    k = idx.shape[-1]
    if not 0 <= b < len(idx.shape) or b > len(x.shape):
        raise ctx.error(f"batch_dims={b} does not fit data rank {len(x.shape)}, indices rank {len(idx.shape)}"
                        )
    if b + k > len(x.shape):
        raise ctx.error(f"indices address {k} dims after {b} batch dims, data has rank {len(x.shape)}")
    return [_t(x.dtype, idx.shape[:-1] + x.shape[b + k:])]


def _nd_linear(idx: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """[..., k] multi-indices into dims (negative ones wrapped) as linear offsets [...]."""
    idx = idx.to(torch.int64)
    if not dims:
        return torch.zeros(idx.shape[:-1], dtype=torch.int64, device=idx.device)
    size = torch.tensor(list(dims), dtype=torch.int64, device=idx.device)
    idx = torch.where(idx < 0, idx + size, idx)
    if idx.numel() and (bool((idx < 0).any()) or bool((idx >= size).any())):
        raise IndexError(f"an index is out of range for dims {list(dims)}")
    strides = [math.prod(dims[j + 1:]) for j in range(len(dims))]
    return (idx * torch.tensor(strides, dtype=torch.int64, device=idx.device)).sum(-1)


def _gathernd_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, idx = xs
    b, k = c.attrs["batch_dims"], idx.shape[-1]
    batch, dims, rest = x.shape[:b], list(x.shape[b:b + k]), x.shape[b + k:]
    nb = math.prod(batch)
    lin = _nd_linear(idx, dims).reshape(nb, -1) if nb else torch.zeros(0, 0, dtype=torch.int64, device=x.device)
    flat = _bits(x).reshape(nb, math.prod(dims), *rest)
    out = flat[torch.arange(nb, device=x.device)[:, None], lin]
    return [_unbits(out.reshape(idx.shape[:-1] + rest), x.dtype)]


register(
    "GatherND", inputs=["data", "indices"], outputs=["output"], infer=_gathernd_infer,
    ref=_with_strings(_gathernd_ref), attrs={"batch_dims": Attr(_A.INT, 0)},
    doc="Gather slices of `data` addressed by the last dim of `indices`, after `batch_dims` shared dims.",
)


# --- Scatter family -----------------------------------------------------------------------------------

_REDUCTIONS = ("none", "add", "mul", "max", "min")
_TORCH_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_check(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "indices")
    x, upd = ctx.tensor(0), ctx.tensor(2)
    if upd.dtype != x.dtype:
        raise ctx.error(f"updates are {upd.dtype} but data is {x.dtype}")
    if x.dtype is DType.STRING and ctx.attrs["reduction"] in ("add", "mul"):
        raise ctx.error(f"reduction '{ctx.attrs['reduction']}' is not defined for strings")
    return [x]


def _scatter_elements_infer(ctx: InferCtx) -> list[TensorType]:
    out = _scatter_check(ctx)
    idx, upd = ctx.tensor(1), ctx.tensor(2)
    if idx.shape is not None and upd.shape is not None and len(idx.shape) != len(upd.shape):
        raise ctx.error(f"indices {idx} and updates {upd} differ in rank")
    _axis(ctx, ctx.rank(0))
    return out


def _scatter(x: torch.Tensor, axis: int, idx: torch.Tensor, upd: torch.Tensor, reduction: str) -> Any:
    """torch.scatter(_reduce) along axis for every dtype (ONNX reductions include the existing value)."""
    if reduction == "none":
        return _unbits(_bits(x).scatter(axis, idx, _bits(upd)), x.dtype)
    ordered = reduction in ("max", "min")
    xa, back = _arith(x, ordered)
    ua, _ = _arith(upd, ordered)
    return back(xa.scatter_reduce(axis, idx, ua, _TORCH_REDUCE[reduction], include_self=True))


def _scatter_elements_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, idx, upd = xs
    a = _norm_axis(c.attrs["axis"], x.dim())
    return [_scatter(x, a, _wrap_index(idx, x.shape[a]), upd, c.attrs["reduction"])]


register(
    "ScatterElements", inputs=["data", "indices", "updates"], outputs=["output"],
    infer=_scatter_elements_infer, ref=_with_strings(_scatter_elements_ref, ins=(0, 2)),
    attrs={"axis": Attr(_A.INT, 0), "reduction": Attr(_A.STRING, "none", choices=_REDUCTIONS)},
    doc="Write (or reduce) `updates` into a copy of `data` at `indices` along `axis`.",
)


def _scatternd_infer(ctx: InferCtx) -> list[TensorType]:
    out = _scatter_check(ctx)
    x, idx, upd = ctx.shape(0), ctx.shape(1), ctx.shape(2)
    if x is not None and idx is not None and upd is not None and idx and isinstance(idx[-1], int):
        want = len(idx) - 1 + len(x) - idx[-1]
        if idx[-1] > len(x) or len(upd) != want:
            raise ctx.error(f"updates have rank {len(upd)}, expected {want} for data rank {len(x)}, "
                            f"indices {list(idx)}")
    return out


def _scatternd_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, idx, upd = xs
    k = idx.shape[-1]
    dims, rest = list(x.shape[:k]), tuple(x.shape[k:])
    lin = _nd_linear(idx, dims).reshape(-1)
    flat = x.reshape(math.prod(dims), *rest)
    src = upd.reshape(lin.numel(), *rest)
    index = lin.reshape((-1,) + (1,) * len(rest)).expand(src.shape)
    return [_scatter(flat, 0, index, src, c.attrs["reduction"]).reshape(x.shape)]


register(
    "ScatterND", inputs=["data", "indices", "updates"], outputs=["output"], infer=_scatternd_infer,
    ref=_with_strings(_scatternd_ref, ins=(0, 2)),
    attrs={"reduction": Attr(_A.STRING, "none", choices=_REDUCTIONS)},
    doc="Write (or reduce) slices of `updates` into a copy of `data` at the multi-indices in `indices`.",
)


def _tensor_scatter_infer(ctx: InferCtx) -> list[TensorType]:
    past, upd = ctx.tensor(0), ctx.tensor(1)
    if upd.dtype != past.dtype:
        raise ctx.error(f"update is {upd.dtype} but past_cache is {past.dtype}")
    if ctx.has(2) and ctx.dtype(2) != I64:
        raise ctx.error(f"write_indices must be int64, got {ctx.dtype(2)}")
    if past.rank is not None:
        if ctx.axis(ctx.attrs["axis"], past.rank) == 0:
            raise ctx.error("axis cannot be 0 (the batch axis)")
        if upd.rank is not None and upd.rank != past.rank:
            raise ctx.error(f"update has rank {upd.rank}, past_cache rank {past.rank}")
    return [past]


def _tensor_scatter_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    past, upd = xs[0], xs[1]
    r = past.dim()
    a = _norm_axis(c.attrs["axis"], r)
    n, s = past.shape[a], upd.shape[a]
    w = torch.zeros(past.shape[0], dtype=torch.int64, device=past.device)
    if len(xs) > 2 and xs[2] is not None:
        w = xs[2].to(torch.int64)
    pos = w[:, None] + torch.arange(s, device=past.device)[None, :]
    if c.attrs["mode"] == "circular":
        pos = pos % n
    elif pos.numel() and (int(pos.max()) >= n or int(pos.min()) < 0):
        raise IndexError(f"write_indices + update length exceed the cache length {n}")
    index = pos.reshape((past.shape[0],) + (1,) * (a - 1) + (s,) + (1,) * (r - a - 1)).expand(upd.shape)
    return [_unbits(_bits(past).scatter(a, index, _bits(upd)), past.dtype)]


register(
    "TensorScatter", inputs=["past_cache", "update", "write_indices?"], outputs=["present_cache"],
    infer=_tensor_scatter_infer, ref=_with_strings(_tensor_scatter_ref, ins=(0, 1)),
    attrs={"mode": Attr(_A.STRING, "linear", choices=("linear", "circular")), "axis": Attr(_A.INT, -2)},
    doc="KV-cache update: write `update` into a copy of `past_cache` along `axis` at per-batch offsets.",
)


# --- Expand, Tile, Pad, CenterCropPad -----------------------------------------------------------------


def _expand_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "shape")
    x = ctx.tensor(0)
    dims = shape_values(ctx.value(1))
    if dims is not None:
        if x.shape is None:
            return [_t(x.dtype, None)]
        return [_t(x.dtype, broadcast_shapes(ctx, x.shape, tuple(dims)))]
    n = _vector_len(ctx, 1)
    if x.shape is None or n is None:
        return [_t(x.dtype, None)]
    r = max(len(x.shape), n)
    lead = (None,) * (r - len(x.shape)) + tuple(x.shape)
    return [_t(x.dtype, [d if isinstance(d, int) and d != 1 else ctx.fresh() for d in lead])]


def _expand_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    out = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(xs[1])))
    return [x.expand(out).contiguous()]


register(
    "Expand", inputs=["input", "shape"], outputs=["output"], infer=_expand_infer,
    ref=_with_strings(_expand_ref), doc="Broadcast the input against `shape` (numpy rules, both directions).",
)


def _tile_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "repeats")
    x = ctx.tensor(0)
    reps = shape_values(ctx.value(1))
    if x.shape is None:
        return [_t(x.dtype, None)]
    if reps is None:
        return [_t(x.dtype, ctx.fresh_shape(len(x.shape)))]
    if len(reps) != len(x.shape):
        raise ctx.error(f"repeats has {len(reps)} entries for rank {len(x.shape)}")
    if any(isinstance(r, int) and r < 0 for r in reps):
        raise ctx.error(f"repeats {reps} has a negative entry")
    return [_t(x.dtype, [sym.mul(d, r) for d, r in zip(x.shape, reps)])]


def _tile_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, reps = xs[0], _ints(xs[1])
    if len(reps) != x.dim() or min(reps, default=0) < 0:
        raise ValueError(f"repeats {reps} do not fit rank {x.dim()}")
    return [x.repeat(*reps) if reps else x.clone()]


register(
    "Tile", inputs=["input", "repeats"], outputs=["output"], infer=_tile_infer, ref=_with_strings(_tile_ref),
    doc="Repeat the input `repeats[i]` times along each axis i.",
)

_PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "pads")
    _int_input(ctx, 3, "axes")
    x = ctx.tensor(0)
    if ctx.has(2) and ctx.dtype(2) != x.dtype:
        raise ctx.error(f"constant_value is {ctx.dtype(2)} but data is {x.dtype}")
    if x.shape is None:
        return [_t(x.dtype, None)]
    r = len(x.shape)
    axes = ctx.const_ints(3) if ctx.has(3) else list(range(r))
    if axes is None:
        return [_t(x.dtype, ctx.fresh_shape(r))]
    axes = _static_axes(ctx, axes, r)
    pads = shape_values(ctx.value(1))
    out = list(x.shape)
    if pads is not None and len(pads) != 2 * len(axes):
        raise ctx.error(f"pads has {len(pads)} entries for {len(axes)} axes (needs 2 per axis)")
    for j, a in enumerate(axes):
        if pads is None:
            out[a] = ctx.fresh()
            continue
        d = out[a] = sym.add(sym.add(x.shape[a], pads[j]), pads[j + len(axes)])
        if isinstance(d, int) and d < 0:
            raise ctx.error(f"pads {pads} crop axis {a} below zero")
    return [_t(x.dtype, out)]


def _pad_axis(x: torch.Tensor, a: int, before: int, after: int, mode: str, fill: torch.Tensor) -> Any:
    d = x.shape[a]
    if before < 0 or after < 0:  # negative pads remove elements
        lo, hi = max(-before, 0), d - max(-after, 0)
        if hi < lo:
            raise ValueError(f"pads ({before}, {after}) remove more than the {d} elements of axis {a}")
        x, d, before, after = x.narrow(a, lo, hi - lo), hi - lo, max(before, 0), max(after, 0)
    if before == 0 and after == 0:
        return x
    if mode == "constant":
        shape = list(x.shape)
        parts = []
        for n, part in ((before, None), (0, x), (after, None)):
            shape[a] = n
            parts.append(part if part is not None else fill.expand(shape))
        return torch.cat(parts, a)
    if d == 0:
        raise ValueError(f"cannot {mode}-pad the empty axis {a}")
    i = torch.arange(-before, d + after, device=x.device)
    if mode == "edge":
        i = i.clamp(0, d - 1)
    elif mode == "wrap":
        i = i % d
    else:
        period = 2 * (d - 1)
        i = i % period if period else torch.zeros_like(i)
        i = torch.where(i >= d, period - i, i)
    return _take(x, a, i)


def _pad_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, pads = xs[0], _ints(xs[1])
    value = xs[2] if len(xs) > 2 else None
    axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(x.dim()))
    axes = [_norm_axis(a, x.dim(), "axes value") for a in axes]
    if len(pads) != 2 * len(axes):
        raise ValueError(f"pads has {len(pads)} entries for {len(axes)} axes")
    fill = torch.zeros((), dtype=x.dtype, device=x.device)
    if value is not None and value.numel():
        fill = value.reshape(-1)[0].to(device=x.device, dtype=x.dtype)
    for j, a in enumerate(axes):
        x = _pad_axis(x, a, pads[j], pads[j + len(axes)], c.attrs["mode"], fill)
    return [x.contiguous()]


register(
    "Pad", inputs=["data", "pads", "constant_value?", "axes?"], outputs=["output"], infer=_pad_infer,
    ref=_with_strings(_pad_ref, ins=(0, 2)), attrs={"mode": Attr(_A.STRING, "constant", choices=_PAD_MODES)},
    doc="Pad (or, with negative pads, crop) `axes`: pads = [begin_0, ..., end_0, ...].",
)


def _center_crop_pad_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 1, "shape")
    x = ctx.tensor(0)
    if x.shape is None:
        return [_t(x.dtype, None)]
    r = len(x.shape)
    axes = _static_axes(ctx, ctx.attrs["axes"] or range(r), r)
    sizes = shape_values(ctx.value(1))
    if sizes is not None and len(sizes) != len(axes):
        raise ctx.error(f"shape has {len(sizes)} entries for {len(axes)} axes")
    out = list(x.shape)
    for j, a in enumerate(axes):
        out[a] = sizes[j] if sizes is not None else ctx.fresh()
    return [_t(x.dtype, out)]


def _center_crop_pad_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, sizes = xs[0], _ints(xs[1])
    axes = [_norm_axis(a, x.dim(), "axes value") for a in (c.attrs["axes"] or range(x.dim()))]
    if len(sizes) != len(axes):
        raise ValueError(f"shape has {len(sizes)} entries for {len(axes)} axes")
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    for a, s in zip(axes, sizes):
        d = x.shape[a]
        if s < d:
            x = x.narrow(a, (d - s) // 2, s)
        elif s > d:
            x = _pad_axis(x, a, (s - d) // 2, s - d - (s - d) // 2, "constant", zero)
    return [x.contiguous()]


register(
    "CenterCropPad", inputs=["input_data", "shape"], outputs=["output_data"], infer=_center_crop_pad_infer,
    ref=_with_strings(_center_crop_pad_ref), attrs={"axes": Attr(_A.INTS, None)},
    doc="Center-crop or zero-pad `axes` (default all) to `shape`.",
)


# --- creation: ConstantOfShape, Range, EyeLike, OneHot ------------------------------------------------


def _cos_dtype(ctx_attrs: dict[str, Any]) -> DType:
    v = ctx_attrs["value"]
    if ctx_attrs["dtype"] is not None:
        return ctx_attrs["dtype"]
    if v is None:
        return DType.FLOAT32
    return DType.STRING if isinstance(v, np.ndarray) else DType.from_torch(v.dtype)


def _cos_infer(ctx: InferCtx) -> list[TensorType]:
    _int_input(ctx, 0, "input")
    v = ctx.attrs["value"]
    if v is not None and (v.size if isinstance(v, np.ndarray) else v.numel()) != 1:
        raise ctx.error(f"value must hold exactly one element, got shape {list(v.shape)}")
    dims = shape_values(ctx.value(0))
    if dims is None:
        return [_t(_cos_dtype(ctx.attrs), ctx.fresh_shape(_vector_len(ctx, 0)))]
    if any(isinstance(d, int) and d < 0 for d in dims):
        raise ctx.error(f"shape {dims} has a negative dim")
    return [_t(_cos_dtype(ctx.attrs), dims)]


def _cos_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    shape, v = _ints(xs[0]), c.attrs["value"]
    if v is None:
        return [torch.zeros(shape, dtype=torch.float32, device=xs[0].device)]
    if isinstance(v, np.ndarray):
        return [np.full(shape, v.reshape(-1)[0], dtype=object)]
    return [v.reshape(()).to(xs[0].device).expand(shape).contiguous()]


register(
    "ConstantOfShape", inputs=["input"], outputs=["output"], infer=_cos_infer, ref=_cos_ref,
    attrs={"value": Attr(_A.TENSOR, None, doc="one element; default float32 0"),
           "dtype": Attr(_A.DTYPE, None, doc="set for narrow types stored widened (int4, ...)")},
    doc="A tensor of the given shape filled with `value`.",
)

_STASH = {1: torch.float32, 11: torch.float64}


def _range_len(start: Any, limit: Any, delta: Any) -> int:
    if delta == 0:
        raise ValueError("Range delta cannot be 0")
    if isinstance(start, int) and isinstance(limit, int) and isinstance(delta, int):
        return max(0, -((start - limit) // delta))
    return max(0, math.ceil((float(limit) - float(start)) / float(delta)))


def _range_infer(ctx: InferCtx) -> list[TensorType]:
    dt = ctx.dtype(0)
    if ctx.dtype(1) != dt or ctx.dtype(2) != dt:
        raise ctx.error(f"start, limit and delta differ in dtype: {dt}, {ctx.dtype(1)}, {ctx.dtype(2)}")
    consts = [ctx.const(i) for i in range(3)]
    if all(isinstance(c, torch.Tensor) and c.numel() == 1 for c in consts):
        vals = [c.reshape(-1)[0].item() for c in consts]
        try:
            return [_t(dt, (_range_len(*vals),))]
        except ValueError as e:
            raise ctx.error(str(e)) from None
    if dt.is_int:
        s, lim, d = (shape_values(ctx.value(i)) for i in range(3))
        if s and lim and d and len(s) == len(lim) == len(d) == 1 and isinstance(d[0], int) and d[0]:
            span = sym.sub(lim[0], s[0]) if d[0] > 0 else sym.sub(s[0], lim[0])
            return [_t(dt, (_smax(0, sym.ceildiv(span, abs(d[0]))),))]
    return [_t(dt, (ctx.fresh("range"),))]


def _range_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    start, limit, delta = (x.reshape(-1)[0] for x in xs)
    dt = start.dtype
    if not dt.is_floating_point:
        return [torch.arange(int(start), int(limit), int(delta), dtype=dt, device=start.device)]
    cdt = dt if dt in (torch.float32, torch.float64) else _STASH[c.attrs["stash_type"]]
    s, d = start.to(cdt), delta.to(cdt)
    n = _range_len(s.item(), limit.to(cdt).item(), d.item())
    return [(s + torch.arange(n, dtype=cdt, device=s.device) * d).to(dt)]


register(
    "Range", inputs=["start", "limit", "delta"], outputs=["output"], infer=_range_infer, ref=_range_ref,
    attrs={"stash_type": Attr(_A.INT, 1, choices=(1, 11),
                              doc="ONNX dtype (1 float, 11 double) float16/bfloat16 ranges are computed in")},
    doc="[start, start+delta, ...) up to `limit` (exclusive); max(ceil((limit-start)/delta), 0) elements.",
)


def _eyelike_infer(ctx: InferCtx) -> list[TensorType]:
    x = ctx.tensor(0)
    if x.rank is not None and x.rank != 2:
        raise ctx.error(f"input must be 2-D, got rank {x.rank}")
    dt = ctx.attrs["dtype"] or x.dtype
    if dt is DType.STRING or dt.is_narrow:
        raise ctx.error(f"EyeLike cannot produce {dt}")
    return [_t(dt, x.shape if x.shape is not None else ctx.fresh_shape(2))]


def _eyelike_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    n, m = xs[0].shape
    dev = xs[0].device
    eye = (torch.arange(m, device=dev)[None, :] - torch.arange(n, device=dev)[:, None]) == c.attrs["k"]
    return [eye.to(c.out_dtype(0).torch)]


register(
    "EyeLike", inputs=["input"], outputs=["output"], infer=_eyelike_infer, ref=_eyelike_ref,
    attrs={"dtype": Attr(_A.DTYPE, None), "k": Attr(_A.INT, 0)},
    doc="Ones on the k-th diagonal of a 2-D tensor shaped like the input (dtype: `dtype` or the input's).",
)


def _onehot_depth(ctx: InferCtx) -> sym.Dim | None:
    c = ctx.const(1)
    if isinstance(c, torch.Tensor) and c.numel() == 1:
        return int(c.reshape(-1)[0].item())
    vals = shape_values(ctx.value(1))
    return vals[0] if vals is not None and len(vals) == 1 else None


def _onehot_infer(ctx: InferCtx) -> list[TensorType]:
    idx, values = ctx.tensor(0), ctx.tensor(2)
    for i, what in ((0, "indices"), (1, "depth")):
        if ctx.dtype(i) is DType.STRING or ctx.dtype(i) is DType.BOOL or ctx.dtype(i).is_complex:
            raise ctx.error(f"{what} must be numeric, got {ctx.dtype(i)}")
    vs = values.shape
    if vs is not None and (len(vs) != 1 or (isinstance(vs[0], int) and vs[0] != 2)):
        raise ctx.error(f"values must be [off_value, on_value], got shape {list(vs)}")
    if idx.shape is None:
        return [_t(values.dtype, None)]
    a = ctx.axis(ctx.attrs["axis"], len(idx.shape), extra=1)
    depth = _onehot_depth(ctx)
    if isinstance(depth, int) and depth < 1:
        raise ctx.error(f"depth must be positive, got {depth}")
    shape = list(idx.shape)
    shape.insert(a, depth if depth is not None else ctx.fresh("depth"))
    return [_t(values.dtype, shape)]


def _onehot_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    idx, depth_t, values = xs
    depth = int(depth_t.reshape(-1)[0].item())
    a = _norm_axis(c.attrs["axis"], idx.dim() + 1)
    i = idx.to(torch.int64)
    i = torch.where(i < 0, i + depth, i)
    hot = (i.unsqueeze(-1) == torch.arange(depth, device=i.device)).movedim(-1, a)  # out-of-range indices match nothing
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return [torch.where(hot, on, off)]


register(
    "OneHot", inputs=["indices", "depth", "values"], outputs=["output"], infer=_onehot_infer,
    ref=_with_strings(_onehot_ref, ins=(2,)), attrs={"axis": Attr(_A.INT, -1)},
    doc="values[1] where indices (negative ones count from depth) hit, values[0] elsewhere; new axis `axis`.",
)


# --- data-dependent selection: NonZero, Compress, Unique, TopK ----------------------------------------


def _nonzero_infer(ctx: InferCtx) -> list[TensorType]:
    r = ctx.rank(0)
    return [_t(I64, (r if r is not None else ctx.fresh("rank"), ctx.fresh("nonzero")))]


def _nonzero_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    return [torch.nonzero(x != 0).T.contiguous().reshape(x.dim(), -1)]


register(
    "NonZero", inputs=["X"], outputs=["Y"], infer=_nonzero_infer, ref=_with_strings(_nonzero_ref, outs=()),
    doc="Indices of the non-zero elements, [rank, count], in row-major order.",
)


def _compress_infer(ctx: InferCtx) -> list[TensorType]:
    x = ctx.tensor(0)
    if ctx.dtype(1) is not DType.BOOL:
        raise ctx.error(f"condition must be bool, got {ctx.dtype(1)}")
    if ctx.rank(1) is not None and ctx.rank(1) != 1:
        raise ctx.error(f"condition must be 1-D, got rank {ctx.rank(1)}")
    cond = ctx.const(1)
    n = int(cond.sum()) if isinstance(cond, torch.Tensor) else ctx.fresh("compress")
    if ctx.attrs["axis"] is None:
        return [_t(x.dtype, (n,))]
    if x.shape is None:
        return [_t(x.dtype, None)]
    a = ctx.axis(ctx.attrs["axis"], len(x.shape))
    return [_t(x.dtype, (*x.shape[:a], n, *x.shape[a + 1:]))]


def _compress_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, cond = xs
    if c.attrs["axis"] is None:
        x, a = x.reshape(-1), 0
    else:
        a = _norm_axis(c.attrs["axis"], x.dim())
    keep = torch.nonzero(cond.reshape(-1)).reshape(-1)
    if keep.numel() and int(keep[-1]) >= x.shape[a]:
        raise IndexError(f"condition selects index {int(keep[-1])} of an axis of {x.shape[a]}")
    return [_take(x, a, keep)]


register(
    "Compress", inputs=["input", "condition"], outputs=["output"], infer=_compress_infer,
    ref=_with_strings(_compress_ref), attrs={"axis": Attr(_A.INT, None)},
    doc="Keep the slices along `axis` (default: of the flattened input) where `condition` is true.",
)


def _unique_infer(ctx: InferCtx) -> list[TensorType]:
    x = ctx.tensor(0)
    u = ctx.fresh("unique")
    axis = ctx.attrs["axis"]
    if axis is None:
        y: Shape | None = (u,)
        inverse: Shape | None = (sym.prod(x.shape),) if x.shape is not None else (ctx.fresh(),)
    elif x.shape is None:
        y, inverse = None, (ctx.fresh(),)
    else:
        a = ctx.axis(axis, len(x.shape))
        y, inverse = (*x.shape[:a], u, *x.shape[a + 1:]), (x.shape[a],)
    return [_t(x.dtype, y), _t(I64, (u,)), _t(I64, inverse), _t(I64, (u,))]


def _unique_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, axis = xs[0], c.attrs["axis"]
    flat, a = (x.reshape(-1), 0) if axis is None else (x, _norm_axis(axis, x.dim()))
    key = _order_key(flat)
    if key.is_complex():  # torch has no complex unique: compare (real, imag) pairs, which orders like numpy
        key, axis = torch.view_as_real(key), a
    if axis is None:
        _, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    else:
        _, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True, dim=a)
    n, u = flat.shape[a], counts.numel()
    dev = inverse.device
    first = torch.full((u,), n, dtype=torch.int64, device=dev).scatter_reduce(
        0, inverse, torch.arange(n, device=dev), "amin")
    if not c.attrs["sorted"]:  # order of first occurrence
        order = torch.argsort(first)
        rank = torch.empty(u, dtype=torch.int64, device=dev)
        rank[order] = torch.arange(u, device=dev)
        first, counts, inverse = first[order], counts[order], rank[inverse]
    return [_take(flat, a, first), first, inverse, counts]


register(
    "Unique", inputs=["X"], outputs=["Y", "indices?", "inverse_indices?", "counts?"], infer=_unique_infer,
    ref=_with_strings(_unique_ref),
    attrs={"axis": Attr(_A.INT, None), "sorted": Attr(_A.INT, 1, choices=(0, 1))},
    doc="Unique elements (or slices along `axis`), sorted or in order of first occurrence, with the index of "
        "each one's first occurrence, the inverse mapping and the counts.",
)


def _topk_infer(ctx: InferCtx) -> list[TensorType]:
    x = ctx.tensor(0)
    if ctx.dtype(1) != I64:
        raise ctx.error(f"K must be int64, got {ctx.dtype(1)}")
    if x.shape is None:
        return [_t(x.dtype, None), _t(I64, None)]
    a = ctx.axis(ctx.attrs["axis"], len(x.shape))
    k = shape_values(ctx.value(1))
    kk = k[0] if k is not None and len(k) == 1 else ctx.fresh("k")
    d = x.shape[a]
    if isinstance(kk, int) and (kk < 0 or (isinstance(d, int) and kk > d)):
        raise ctx.error(f"K={kk} is out of range for a dim of {x.shape[a]}")
    shape = (*x.shape[:a], kk, *x.shape[a + 1:])
    return [_t(x.dtype, shape), _t(I64, shape)]


def _topk_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, k = xs[0], int(xs[1].reshape(-1)[0])
    a = _norm_axis(c.attrs["axis"], x.dim())
    if not 0 <= k <= x.shape[a]:
        raise ValueError(f"K={k} is out of range for a dim of {x.shape[a]}")
    # A stable sort puts equal values in index order, as ONNX asks, in both directions.
    order = torch.sort(_order_key(x), dim=a, descending=bool(c.attrs["largest"]), stable=True).indices
    idx = order.narrow(a, 0, k).contiguous()
    return [_unbits(torch.gather(_bits(x), a, idx), x.dtype), idx]


register(
    "TopK", inputs=["X", "K"], outputs=["Values", "Indices"], infer=_topk_infer, ref=_topk_ref,
    attrs={"axis": Attr(_A.INT, -1), "largest": Attr(_A.INT, 1, choices=(0, 1)),
           "sorted": Attr(_A.INT, 1, choices=(0, 1), doc="kiln always returns them sorted")},
    doc="The K largest (or smallest) elements along `axis` and their indices; of equal values the lower "
        "index comes first.",
)


# --- ArgMax, ArgMin, CumSum, CumProd ------------------------------------------------------------------


def _arg_infer(ctx: InferCtx) -> list[TensorType]:
    x = ctx.tensor(0)
    if x.dtype is DType.STRING or x.dtype.is_complex:
        raise ctx.error(f"cannot order {x.dtype} values")
    if x.shape is None:
        return [_t(I64, None)]
    a = ctx.axis(ctx.attrs["axis"], len(x.shape))
    keep = (1,) if ctx.attrs["keepdims"] else ()
    return [_t(I64, x.shape[:a] + keep + x.shape[a + 1:])]


def _arg_ref(largest: bool) -> RefFn:
    def ref(c: RefCtx, xs: list[Any]) -> list[Any]:
        x = xs[0]
        a = _norm_axis(c.attrs["axis"], x.dim())
        key = _order_key(x)
        last = bool(c.attrs["select_last_index"])
        if last:
            key = key.flip(a)
        fn = torch.argmax if largest else torch.argmin
        r = fn(key, dim=a, keepdim=bool(c.attrs["keepdims"]))  # torch picks the first of equal values
        return [x.shape[a] - 1 - r if last else r]

    return ref


for _name, _largest in (("ArgMax", True), ("ArgMin", False)):
    register(
        _name, inputs=["data"], outputs=["reduced"], infer=_arg_infer, ref=_arg_ref(_largest),
        attrs={"axis": Attr(_A.INT, 0), "keepdims": Attr(_A.INT, 1, choices=(0, 1)),
               "select_last_index": Attr(_A.INT, 0, choices=(0, 1))},
        doc=f"Index (int64) of the {'largest' if _largest else 'smallest'} element along `axis`; "
            "the first one of equal values unless select_last_index.",
    )


def _cum_infer(ctx: InferCtx) -> list[TensorType]:
    x = ctx.tensor(0)
    if x.dtype is DType.STRING or x.dtype is DType.BOOL:
        raise ctx.error(f"cannot accumulate {x.dtype} values")
    if ctx.dtype(1) not in (DType.INT32, I64):
        raise ctx.error(f"axis must be int32 or int64, got {ctx.dtype(1)}")
    r = ctx.rank(1)
    if r is not None and r > 1:
        raise ctx.error(f"axis must be a scalar, got rank {r}")
    return [x]


def _cum_ref(op: str) -> RefFn:
    def ref(c: RefCtx, xs: list[Any]) -> list[Any]:
        x, axis = xs
        if axis.numel() != 1:
            raise ValueError(f"axis must hold one value, got {axis.numel()}")
        a = _norm_axis(int(axis.reshape(-1)[0]), x.dim())
        y, back = _arith(x)
        if c.attrs["reverse"]:
            y = y.flip(a)
        if c.attrs["exclusive"] and y.shape[a]:
            ident = (torch.zeros_like if op == "sum" else torch.ones_like)(y.narrow(a, 0, 1))
            y = torch.cat([ident, y.narrow(a, 0, y.shape[a] - 1)], a)
        y = (torch.cumsum if op == "sum" else torch.cumprod)(y, a, dtype=y.dtype)
        if c.attrs["reverse"]:
            y = y.flip(a)
        return [back(y)]

    return ref


for _name, _op in (("CumSum", "sum"), ("CumProd", "prod")):
    register(
        _name, inputs=["x", "axis"], outputs=["y"], infer=_cum_infer, ref=_cum_ref(_op),
        attrs={"exclusive": Attr(_A.INT, 0, choices=(0, 1)), "reverse": Attr(_A.INT, 0, choices=(0, 1))},
        doc=f"Cumulative {_op} along the scalar input `axis`; exclusive shifts by one, reverse runs back.",
    )


# --- layout: ReverseSequence, Trilu, DepthToSpace, SpaceToDepth ---------------------------------------


def _revseq_infer(ctx: InferCtx) -> list[TensorType]:
    b, t = ctx.attrs["batch_axis"], ctx.attrs["time_axis"]
    if {b, t} != {0, 1}:
        raise ctx.error(f"batch_axis and time_axis must be 0 and 1 (in either order), got {b} and {t}")
    if ctx.dtype(1) != I64:
        raise ctx.error(f"sequence_lens must be int64, got {ctx.dtype(1)}")
    r = ctx.rank(0)
    if r is not None and r < 2:
        raise ctx.error(f"input must have rank >= 2, got {r}")
    return [ctx.tensor(0)]


def _revseq_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, lens = xs
    ta = c.attrs["time_axis"]
    steps = x.shape[ta]
    t = torch.arange(steps, device=x.device)[None, :]
    n = lens.to(device=x.device, dtype=torch.int64).reshape(-1, 1)
    if n.numel() and (int(n.min()) < 0 or int(n.max()) > steps):
        raise ValueError(f"sequence_lens must be in [0, {steps}]")
    src = torch.where(t < n, n - 1 - t, t)  # [batch, time]
    if ta == 0:
        src = src.T
    index = src.reshape(tuple(src.shape) + (1,) * (x.dim() - 2)).expand(x.shape)
    return [_unbits(torch.gather(_bits(x), ta, index), x.dtype)]


register(
    "ReverseSequence", inputs=["input", "sequence_lens"], outputs=["Y"], infer=_revseq_infer,
    ref=_with_strings(_revseq_ref), attrs={"batch_axis": Attr(_A.INT, 1), "time_axis": Attr(_A.INT, 0)},
    doc="Reverse the first sequence_lens[b] steps of each batch entry b along the time axis.",
)


def _trilu_infer(ctx: InferCtx) -> list[TensorType]:
    r = ctx.rank(0)
    if r is not None and r < 2:
        raise ctx.error(f"input must have rank >= 2, got {r}")
    if ctx.has(1) and ctx.dtype(1) != I64:
        raise ctx.error(f"k must be int64, got {ctx.dtype(1)}")
    return [ctx.tensor(0)]


def _trilu_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    k = int(xs[1].reshape(-1)[0]) if len(xs) > 1 and xs[1] is not None else 0
    n, m = x.shape[-2:]
    diag = torch.arange(m, device=x.device)[None, :] - torch.arange(n, device=x.device)[:, None]
    keep = diag >= k if c.attrs["upper"] else diag <= k
    return [torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))]


register(
    "Trilu", inputs=["input", "k?"], outputs=["output"], infer=_trilu_infer, ref=_with_strings(_trilu_ref),
    attrs={"upper": Attr(_A.INT, 1, choices=(0, 1))},
    doc="Keep the upper (or lower) triangle of the last two dims from diagonal k; zero the rest.",
)


def _block_infer(to_space: bool) -> Callable[[InferCtx], list[TensorType]]:
    def infer(ctx: InferCtx) -> list[TensorType]:
        x = ctx.tensor(0)
        b = ctx.attrs["blocksize"]
        if b < 1:
            raise ctx.error(f"blocksize must be positive, got {b}")
        if x.shape is None:
            return [_t(x.dtype, ctx.fresh_shape(4))]
        if len(x.shape) != 4:
            raise ctx.error(f"input must be 4-D [N, C, H, W], got rank {len(x.shape)}")
        n, ch, h, w = x.shape
        if to_space:
            _divisible(ctx, ch, b * b, "channels")
            return [_t(x.dtype, (n, sym.floordiv(ch, b * b), sym.mul(h, b), sym.mul(w, b)))]
        _divisible(ctx, h, b, "height")
        _divisible(ctx, w, b, "width")
        return [_t(x.dtype, (n, sym.mul(ch, b * b), sym.floordiv(h, b), sym.floordiv(w, b)))]

    return infer


def _divisible(ctx: InferCtx, d: sym.Dim, by: int, what: str) -> None:
    if isinstance(d, int) and d % by:
        raise ctx.error(f"{what} ({d}) must be divisible by {by}")


def _d2s_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, b = xs[0], c.attrs["blocksize"]
    n, ch, h, w = x.shape
    if ch % (b * b):
        raise ValueError(f"channels ({ch}) must be divisible by {b * b}")
    oc = ch // (b * b)
    if c.attrs["mode"] == "DCR":
        y = x.reshape(n, b, b, oc, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, oc, b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, oc, h * b, w * b)]


def _s2d_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, b = xs[0], c.attrs["blocksize"]
    n, ch, h, w = x.shape
    if h % b or w % b:
        raise ValueError(f"height and width ({h}, {w}) must be divisible by {b}")
    y = x.reshape(n, ch, h // b, b, w // b, b)
    y = y.permute(0, 3, 5, 1, 2, 4) if c.attrs["mode"] == "DCR" else y.permute(0, 1, 3, 5, 2, 4)
    return [y.reshape(n, ch * b * b, h // b, w // b)]


_BLOCK_ATTRS = {"blocksize": Attr(_A.INT), "mode": Attr(_A.STRING, "DCR", choices=("DCR", "CRD"))}
register(
    "DepthToSpace", inputs=["input"], outputs=["output"], infer=_block_infer(True),
    ref=_with_strings(_d2s_ref), attrs=_BLOCK_ATTRS,
    doc="Move channel blocks into blocksize x blocksize spatial blocks (DCR or CRD order).",
)
register(
    "SpaceToDepth", inputs=["input"], outputs=["output"], infer=_block_infer(False),
    ref=_with_strings(_s2d_ref), attrs=_BLOCK_ATTRS,
    doc="Move blocksize x blocksize spatial blocks into channels (DCR or CRD order).",
)


# --- Dropout ------------------------------------------------------------------------------------------


def _dropout_infer(ctx: InferCtx) -> list[TensorType]:
    x = ctx.tensor(0)
    if ctx.has(1) and not ctx.dtype(1).is_float:
        raise ctx.error(f"ratio must be a float, got {ctx.dtype(1)}")
    if ctx.has(2) and ctx.dtype(2) is not DType.BOOL:
        raise ctx.error(f"training_mode must be bool, got {ctx.dtype(2)}")
    return [x, _t(DType.BOOL, x.shape)]


def _dropout_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    ratio = float(xs[1].reshape(-1)[0]) if len(xs) > 1 and xs[1] is not None else 0.5
    training = bool(xs[2].reshape(-1)[0]) if len(xs) > 2 and xs[2] is not None else False
    if not training or ratio == 0:
        return [x, torch.ones(x.shape, dtype=torch.bool, device=x.device)]
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    seed = c.attrs["seed"]
    if seed is None:
        u = torch.rand(x.shape, dtype=torch.float64, device=x.device)
    else:  # a seeded mask is reproducible: numpy's MT19937 stream for that seed
        u = torch.from_numpy(np.random.RandomState(seed % 2**32).uniform(0.0, 1.0, tuple(x.shape))).to(x.device)
    mask = u >= ratio
    return [((x * mask) * (1.0 / (1.0 - ratio))).to(x.dtype), mask]


register(
    "Dropout", inputs=["data", "ratio?", "training_mode?"], outputs=["output", "mask?"], infer=_dropout_infer,
    ref=_dropout_ref, attrs={"seed": Attr(_A.INT, None)},
    doc="Inference (training_mode false or absent, or ratio 0): the input and an all-true mask. Training: "
        "zero elements with probability `ratio`, scale the rest by 1/(1-ratio).",
)
