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
    attrs={"value": Attr(AttrKind.TENSOR), "dtype": Attr(AttrKind.DTYPE, None,
                                                         doc="set for narrow types stored widened (int4, ...)")},
    doc="A constant tensor (the ONNX value_* attribute forms are all normalized to `value`).",
)


# --- storage helpers ----------------------------------------------------------------------------------

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)
_UNSIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_SAME_WIDTH = {**_UNSIGNED, **{f: torch.int8 for f in _FLOAT8}}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t as a same-width integer where torch's CPU indexing kernels lack its dtype (ops that only move data)."""
    v = _SAME_WIDTH.get(t.dtype)
    return t if v is None else t.view(v)


def _unbits(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.view(dtype)


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


def _arith(t: torch.Tensor, ordered: bool = False) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """t in a dtype torch can add/multiply (or, with `ordered`, take max/min of), and the way back."""
    dt = t.dtype
    if dt in _UNSIGNED:
        if ordered:
            flip = torch.iinfo(_UNSIGNED[dt]).min
            return _order_key(t), lambda r: (r ^ flip).view(dt)
        return t.view(_UNSIGNED[dt]), lambda r: r.view(dt)  # two's complement wraps like unsigned
    if dt == torch.bool:
        return t.to(torch.uint8), lambda r: r != 0
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
        xs, at = list(xs), 1
        for i in strings:
            a = xs[i]
            xs[i] = torch.from_numpy(codes.reshape(-1)[at:at + a.size].astype(np.int64)).reshape(a.shape)
            at += a.size
        res = list(ref(c, xs))
        for o in range(len(res)) if outs is None else outs:
            if o < len(res) and isinstance(res[o], torch.Tensor):
                idx = res[o].numpy()
                res[o] = np.asarray(table[idx.reshape(-1)], dtype=object).reshape(idx.shape)
        return res

    return run


def _ints(t: Any) -> list[int]:
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
    Identity, Add/Sub/Mul/Div). None when unknown."""
    return _values(v, 0)


def _values(v: Value | None, depth: int) -> Dims | None:
    if v is None or depth > _MAX_DEPTH or not isinstance(v.type, TensorType) or not v.type.dtype.is_int:
        return None
    if v.type.rank is not None and v.type.rank > 1:
        return None
    c = const_value(v)
    if isinstance(c, torch.Tensor):
        return _ints(c) if c.dim() <= 1 and c.numel() <= _MAX_VALUES else None
    p = v.producer
    rule = _VALUE_RULES.get(p.op) if p is not None else None
    if p is None or rule is None:
        return None
    try:
        return rule(p, depth + 1)
    except (ValueError, IndexError, TypeError, ZeroDivisionError):
        return None


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
    if data is None or data.type.rank != 1 or p.attrs.get("axis", 0) not in (0, -1):
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
    out = p.outputs[0]
    if out.type.rank is None or out.type.rank > 1:
        return None
    return _v_same(p, depth)


_VALUE_RULES: dict[str, Callable[[Node, int], Dims | None]] = {
    "Shape": _v_shape, "Size": _v_size, "Identity": _v_same, "Cast": _v_same, "Concat": _v_concat,
    "Gather": _v_gather, "Slice": _v_slice, "Add": _v_arith, "Sub": _v_arith, "Mul": _v_arith,
    "Div": _v_arith, "Squeeze": _v_reshaped, "Unsqueeze": _v_reshaped, "Reshape": _v_reshaped,
    "Flatten": _v_reshaped,
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
    a = ctx.axis(ctx.attrs["axis"], len(x.shape), extra=1)
    return [_t(x.dtype, (sym.prod(x.shape[:a]), sym.prod(x.shape[a:])))]


def _flatten_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    a = _norm_axis(c.attrs["axis"], x.dim() + 1)
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
    return [_t(x.dtype, x.shape[:a] + (s,) + x.shape[a + 1:]) for s in sizes]


def _split_sizes(ctx: InferCtx, d: sym.Dim, n: int) -> list[sym.Dim]:
    if not ctx.has(1):
        return _even_split(d, _split_count(ctx.attrs, n))
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
