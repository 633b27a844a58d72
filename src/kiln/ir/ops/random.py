"""Op table entries: random number generators.

With a `seed` attribute, each run draws from a generator seeded with it (the same values every run); without
one, from torch's global generator. ONNX does not define the values, only their distribution, so no other
implementation is expected to produce the same numbers. Draws happen on the CPU whatever the device (a seeded
op gives the same values on every device) and the result moves to the device of the op's input.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import TensorType, ValueType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register

FLOATS = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64)


def _generator(c: RefCtx) -> torch.Generator | None:
    seed = c.attrs["seed"]
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed))


def _float_out(ctx: InferCtx, dtype: DType) -> DType:
    if dtype not in FLOATS:
        raise ctx.error(f"cannot draw {dtype} values (supported: {', '.join(map(str, FLOATS))})")
    return dtype


def _compute(dtype: DType) -> torch.dtype:
    return torch.float64 if dtype is DType.FLOAT64 else torch.float32


def _like_dtype(ctx: InferCtx) -> DType:
    return _float_out(ctx, ctx.attrs["dtype"] or ctx.dtype(0))


# --- uniform and normal -------------------------------------------------------------------------------


def _shape_attr(ctx: InferCtx) -> tuple[int, ...]:
    shape = tuple(ctx.attrs["shape"])
    if any(d < 0 for d in shape):
        raise ctx.error(f"shape {list(shape)} has a negative dim")
    return shape


def _device(xs: list[Any]) -> torch.device:
    return xs[0].device if xs else torch.device("cpu")


def _uniform(c: RefCtx, shape: Any, device: torch.device) -> list[Any]:
    dt = c.out_dtype()
    u = torch.rand(tuple(shape), generator=_generator(c), dtype=_compute(dt))
    return [(u * (c.attrs["high"] - c.attrs["low"]) + c.attrs["low"]).to(device=device, dtype=dt.torch)]


def _normal(c: RefCtx, shape: Any, device: torch.device) -> list[Any]:
    dt = c.out_dtype()
    z = torch.randn(tuple(shape), generator=_generator(c), dtype=_compute(dt))
    return [(z * c.attrs["scale"] + c.attrs["mean"]).to(device=device, dtype=dt.torch)]


_SEED = {"seed": Attr(AttrKind.FLOAT, None)}
_UNIFORM = {"low": Attr(AttrKind.FLOAT, 0.0), "high": Attr(AttrKind.FLOAT, 1.0), **_SEED}
_NORMAL = {"mean": Attr(AttrKind.FLOAT, 0.0), "scale": Attr(AttrKind.FLOAT, 1.0), **_SEED}

register(
    "RandomUniform", inputs=[], outputs=["output"],
    infer=lambda ctx: [TensorType(_float_out(ctx, ctx.attrs["dtype"]), _shape_attr(ctx))],
    ref=lambda c, xs: _uniform(c, c.attrs["shape"], _device(xs)),
    attrs={"shape": Attr(AttrKind.INTS), "dtype": Attr(AttrKind.DTYPE, DType.FLOAT32), **_UNIFORM},
    doc="Values drawn uniformly from [low, high).",
)
register(
    "RandomUniformLike", inputs=["input"], outputs=["output"],
    infer=lambda ctx: [TensorType(_like_dtype(ctx), ctx.shape(0))],
    ref=lambda c, xs: _uniform(c, xs[0].shape, _device(xs)),
    attrs={"dtype": Attr(AttrKind.DTYPE, None), **_UNIFORM},
    doc="Values drawn uniformly from [low, high), shaped like the input (of its dtype unless `dtype`).",
)
register(
    "RandomNormal", inputs=[], outputs=["output"],
    infer=lambda ctx: [TensorType(_float_out(ctx, ctx.attrs["dtype"]), _shape_attr(ctx))],
    ref=lambda c, xs: _normal(c, c.attrs["shape"], _device(xs)),
    attrs={"shape": Attr(AttrKind.INTS), "dtype": Attr(AttrKind.DTYPE, DType.FLOAT32), **_NORMAL},
    doc="Values drawn from a normal distribution N(mean, scale^2).",
)
register(
    "RandomNormalLike", inputs=["input"], outputs=["output"],
    infer=lambda ctx: [TensorType(_like_dtype(ctx), ctx.shape(0))],
    ref=lambda c, xs: _normal(c, xs[0].shape, _device(xs)),
    attrs={"dtype": Attr(AttrKind.DTYPE, None), **_NORMAL},
    doc="Values drawn from N(mean, scale^2), shaped like the input (of its dtype unless `dtype`).",
)


# --- Multinomial and Bernoulli ------------------------------------------------------------------------


def _multinomial_infer(ctx: InferCtx) -> list[ValueType]:
    t = ctx.tensor(0)
    _float_out(ctx, t.dtype)
    if t.rank not in (None, 2):
        raise ctx.error(f"the input must be [batch, classes], got {t}")
    if ctx.attrs["sample_size"] < 1:
        raise ctx.error(f"sample_size must be positive, got {ctx.attrs['sample_size']}")
    batch = ctx.fresh("batch") if t.shape is None else t.shape[0]
    return [TensorType(ctx.attrs["dtype"], (batch, ctx.attrs["sample_size"]))]


def _multinomial_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    # The input holds unnormalized log-probabilities.
    probs = torch.softmax(xs[0].cpu().to(torch.float64), dim=-1)
    draws = torch.multinomial(probs, c.attrs["sample_size"], replacement=True, generator=_generator(c))
    return [draws.to(device=_device(xs), dtype=c.out_dtype().torch)]


register(
    "Multinomial", inputs=["input"], outputs=["output"], infer=_multinomial_infer, ref=_multinomial_ref,
    attrs={"sample_size": Attr(AttrKind.INT, 1),
           "dtype": Attr(AttrKind.DTYPE, DType.INT32, choices=(DType.INT32, DType.INT64)), **_SEED},
    doc="sample_size class indices per row, drawn with replacement from softmax(input) ([batch, classes]).",
)


def _bernoulli_infer(ctx: InferCtx) -> list[ValueType]:
    t = ctx.tensor(0)
    _float_out(ctx, t.dtype)
    out = ctx.attrs["dtype"] or t.dtype
    if out is DType.STRING or out.is_narrow or out.is_complex:
        raise ctx.error(f"cannot produce {out} values")
    return [TensorType(out, t.shape)]


def _bernoulli_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    p = xs[0].cpu().to(torch.float64)
    return [torch.bernoulli(p, generator=_generator(c)).to(device=_device(xs), dtype=c.out_dtype().torch)]


register(
    "Bernoulli", inputs=["input"], outputs=["output"], infer=_bernoulli_infer, ref=_bernoulli_ref,
    attrs={"dtype": Attr(AttrKind.DTYPE, None), **_SEED},
    doc="1 with probability input, else 0 (of the input's dtype unless `dtype`).",
)
