"""Op table entries: reductions (ReduceSum, ReduceMean, ReduceMax, ..., ReduceLogSumExp).

Semantics follow the newest ONNX versions: `axes` is an optional int64 input (absent or empty means every
axis, unless `noop_with_empty_axes` is set, in which case nothing is reduced). The composite reductions (L1,
L2, SumSquare, LogSum, LogSumExp) are defined as ONNX defines them, by their function bodies: an elementwise
step, a sum, an elementwise step. So with `noop_with_empty_axes` they still apply their elementwise steps
(ReduceL2 of nothing is |x|, ReduceSumSquare of nothing is x*x), exactly as the function body computes.

Reducing over an empty set gives the reduction's identity: 0 for sums, 1 for ReduceProd, -inf (or the dtype's
minimum) for ReduceMax, +inf (or maximum) for ReduceMin, -inf for ReduceLogSum and ReduceLogSumExp, NaN for
ReduceMean of floats (0 for integers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Shape, TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register

_SIGN_BIT = -(2**63)


def float_compute(t: torch.Tensor) -> torch.Tensor:
    """A float tensor in the precision its math runs in on CPU: half types go to float32."""
    return t.float() if t.is_floating_point() and t.dtype.itemsize < 4 else t


def is_float(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


def int_compute(t: torch.Tensor) -> torch.Tensor:
    """An integer tensor widened to int64: sums and products wrap exactly as in the narrower type."""
    return t.to(torch.int64)


def check_dtype(ctx: InferCtx, i: int, *, floats: bool = True, ints: bool = True,
                bool_: bool = False) -> DType:
    """The dtype of input i, raising a ShapeError naming the op when the op does not accept it."""
    dt = ctx.dtype(i)
    ok = (floats and dt.is_float) or (ints and dt.is_int) or (bool_ and dt is DType.BOOL)
    if not ok:
        raise ctx.error(f"input {i} has dtype {dt}, which {ctx.node.op} does not accept")
    return dt


# --- shape inference ----------------------------------------------------------------------------------


def reduced_shape(ctx: InferCtx, shape: Shape | None, axes_input: int, keep: bool,
                  noop: bool) -> Shape | None:
    """The output shape of a reduction whose axes come from input `axes_input` (which may be absent)."""
    axes: list[int] | None = []
    if ctx.has(axes_input):
        axes = ctx.const_ints(axes_input)
        if axes is None:
            return _dynamic_axes_shape(ctx, shape, axes_input, keep, noop)
    if not axes:
        if noop:
            return shape
        if shape is None:
            return None if keep else ()
        return tuple(1 for _ in shape) if keep else ()
    if shape is None:
        return None
    dims = normalize_axes(ctx, axes, len(shape))
    return tuple(1 if i in dims else d for i, d in enumerate(shape) if keep or i not in dims)


def normalize_axes(ctx: InferCtx, axes: Sequence[int], rank: int) -> set[int]:
    dims = {ctx.axis(a, rank) for a in axes}
    if len(dims) != len(axes):
        raise ctx.error(f"axes {list(axes)} name an axis twice")
    return dims


def _dynamic_axes_shape(ctx: InferCtx, shape: Shape | None, axes_input: int, keep: bool,
                        noop: bool) -> Shape | None:
    """Axes known only at run time: keepdims keeps the rank; otherwise a static axes length gives it."""
    if shape is None:
        return None
    if keep:
        return tuple(d if d == 1 else ctx.fresh("r") for d in shape)
    ashape = ctx.shape(axes_input)
    if ashape is None or len(ashape) != 1 or not isinstance(ashape[0], int):
        return None
    k = ashape[0]
    if k == 0:
        return shape if noop else ()
    if k > len(shape):
        raise ctx.error(f"{k} axes given for a rank-{len(shape)} input")
    return tuple(ctx.fresh("r") for _ in range(len(shape) - k))


# --- reference ----------------------------------------------------------------------------------------


Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Reduction:
    """A reduction as pre (elementwise) -> kind (sum/prod/max/min/mean/logsumexp) -> post (elementwise)."""

    kind: str
    pre: Fn | None = None
    post: Fn | None = None
    int_as_float: bool = False
    """Integers are computed in float64 and truncated back (sqrt, log)."""


def ref_dims(c: RefCtx, x: torch.Tensor, axes: torch.Tensor | None) -> tuple[int, ...] | None:
    """The axes to reduce, normalized; None means reduce nothing (noop_with_empty_axes)."""
    given = [] if axes is None else [int(a) for a in axes.reshape(-1).tolist()]
    if not given:
        return None if c.attrs["noop_with_empty_axes"] else tuple(range(x.dim()))
    r = x.dim()
    for a in given:
        if not -max(r, 1) <= a < max(r, 1):
            raise ValueError(f"axis {a} is out of range for rank {r}")
    return tuple(sorted({a + r if a < 0 else a for a in given}))


def _widen(x: torch.Tensor, spec: Reduction) -> torch.Tensor:
    if x.dtype == torch.bool:
        return x.to(torch.int64)
    if is_float(x):
        return float_compute(x)
    if spec.int_as_float:
        return x.to(torch.float64)
    if x.dtype == torch.uint64 and spec.kind in ("max", "min"):
        # Flipping the sign bit maps uint64 order onto int64 order.
        return torch.bitwise_xor(x.view(torch.int64), _SIGN_BIT)
    return int_compute(x)


def _narrow(r: torch.Tensor, like: torch.Tensor, spec: Reduction) -> torch.Tensor:
    if like.dtype == torch.bool:
        return r != 0
    if like.dtype == torch.uint64 and spec.kind in ("max", "min"):
        return torch.bitwise_xor(r, _SIGN_BIT).view(torch.uint64)
    return r.to(like.dtype)


def _identity_fill(kind: str, w: torch.Tensor, like: torch.Tensor) -> float | int:
    """The value of max/min over an empty set, in the widened dtype `w` (see `_widen`)."""
    lo = kind == "max"
    if is_float(w):
        return float("-inf") if lo else float("inf")
    if like.dtype == torch.bool:
        return 0 if lo else 1
    if like.dtype == torch.uint64:  # sign-flipped int64 (see _widen)
        return torch.iinfo(torch.int64).min if lo else torch.iinfo(torch.int64).max
    info = torch.iinfo(like.dtype)
    return info.min if lo else info.max


def _apply(spec: Reduction, w: torch.Tensor, dims: tuple[int, ...], keep: bool,
           like: torch.Tensor) -> torch.Tensor:
    count = 1
    for d in dims:
        count *= w.shape[d]
    if spec.kind == "sum":
        return torch.sum(w, dim=dims, keepdim=keep) if dims else w.clone()
    if spec.kind == "prod":
        for d in sorted(dims, reverse=True):
            w = torch.prod(w, dim=d, keepdim=keep)
        return w
    if spec.kind == "mean":
        s = torch.sum(w, dim=dims, keepdim=keep) if dims else w.clone()
        if is_float(w):
            return s / count
        return torch.div(s, count, rounding_mode="trunc") if count else torch.zeros_like(s)
    if count == 0:
        shape = torch.sum(w, dim=dims, keepdim=keep).shape if dims else w.shape
        fill = float("-inf") if spec.kind == "logsumexp" else _identity_fill(spec.kind, w, like)
        return torch.full(shape, fill, dtype=w.dtype, device=w.device)
    if not dims:
        return w.clone()
    if spec.kind == "max":
        return torch.amax(w, dim=dims, keepdim=keep)
    if spec.kind == "min":
        return torch.amin(w, dim=dims, keepdim=keep)
    if spec.kind == "logsumexp":
        return torch.logsumexp(w, dim=dims, keepdim=keep)
    raise ValueError(spec.kind)


def reduce_tensor(spec: Reduction, x: torch.Tensor, dims: tuple[int, ...] | None, keep: bool) -> torch.Tensor:
    """Run a reduction over `dims` (None: over nothing, only the elementwise steps apply)."""
    w = _widen(x, spec)
    if spec.pre is not None:
        w = spec.pre(w)
    r = _apply(spec, w, dims or (), keep, x) if dims is not None else w
    if spec.post is not None:
        r = spec.post(r)
    return _narrow(r, x, spec)


def _reduce_ref(spec: Reduction) -> Callable[[RefCtx, list[Any]], list[Any]]:
    def ref(c: RefCtx, xs: list[Any]) -> list[Any]:
        x = xs[0]
        dims = ref_dims(c, x, xs[1] if len(xs) > 1 else None)
        return [reduce_tensor(spec, x, dims, bool(c.attrs["keepdims"]))]

    return ref


def _reduce_infer(*, bool_: bool = False) -> Callable[[InferCtx], list[TensorType]]:
    def infer(ctx: InferCtx) -> list[TensorType]:
        dt = check_dtype(ctx, 0, bool_=bool_)
        if ctx.has(1) and ctx.dtype(1) is not DType.INT64:
            raise ctx.error(f"axes must be int64, got {ctx.dtype(1)}")
        keep, noop = bool(ctx.attrs["keepdims"]), bool(ctx.attrs["noop_with_empty_axes"])
        return [TensorType(dt, reduced_shape(ctx, ctx.shape(0), 1, keep, noop))]

    return infer


REDUCE_ATTRS = {
    "keepdims": Attr(AttrKind.INT, 1, doc="nonzero: keep reduced axes as size 1"),
    "noop_with_empty_axes": Attr(AttrKind.INT, 0, doc="nonzero: absent/empty axes reduce nothing"),
}


def _square(t: torch.Tensor) -> torch.Tensor:
    return t * t


REDUCTIONS: dict[str, Reduction] = {
    "ReduceSum": Reduction("sum"),
    "ReduceMean": Reduction("mean"),
    "ReduceProd": Reduction("prod"),
    "ReduceMax": Reduction("max"),
    "ReduceMin": Reduction("min"),
    "ReduceL1": Reduction("sum", pre=torch.abs),
    "ReduceL2": Reduction("sum", pre=_square, post=torch.sqrt, int_as_float=True),
    "ReduceSumSquare": Reduction("sum", pre=_square),
    "ReduceLogSum": Reduction("sum", post=torch.log, int_as_float=True),
    "ReduceLogSumExp": Reduction("logsumexp", int_as_float=True),
}

for _name, _spec in REDUCTIONS.items():
    register(
        _name, inputs=["data", "axes?"], outputs=["reduced"], attrs=dict(REDUCE_ATTRS),
        infer=_reduce_infer(bool_=_spec.kind in ("max", "min")), ref=_reduce_ref(_spec),
        doc=f"{_name} over the axes given by the optional int64 `axes` input (ONNX semantics, opset 18+).",
    )
