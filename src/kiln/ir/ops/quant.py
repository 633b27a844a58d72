"""Op table entries: linear quantization (QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear).

Granularity follows the scale's shape: a scalar (or one-element) scale is per tensor, a 1-D scale is per axis,
and a scale of the input's rank is blocked (each scale covers `block_size` consecutive elements along `axis`).
Narrow results are stored widened (int4 in int8, float4 in float32) with their range enforced here.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Shape, TensorType, ValueType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register
from kiln.ir.ops.cast import round_to_float

D = DType
INT_RANGES: dict[DType, tuple[int, int]] = {
    D.UINT8: (0, 255), D.INT8: (-128, 127), D.UINT16: (0, 65535), D.INT16: (-32768, 32767),
    D.UINT4: (0, 15), D.INT4: (-8, 7), D.UINT2: (0, 3), D.INT2: (-2, 1),
}
FLOAT8 = (D.FLOAT8_E4M3FN, D.FLOAT8_E4M3FNUZ, D.FLOAT8_E5M2, D.FLOAT8_E5M2FNUZ)
NARROW_FLOATS = (D.FLOAT4_E2M1, D.FLOAT6_E2M3, D.FLOAT6_E3M2)
QUANT_TYPES = (*INT_RANGES, *FLOAT8, *NARROW_FLOATS)
HIGH_TYPES = (D.FLOAT32, D.FLOAT16, D.BFLOAT16)
SCALE_TYPES = (*HIGH_TYPES, D.INT32, D.FLOAT8_E8M0)


# --- shared -------------------------------------------------------------------------------------------


def _per_tensor(shape: Shape) -> bool:
    return len(shape) == 0 or shape == (1,)


def _check_params(ctx: InferCtx, x: TensorType) -> None:
    """The scale (and zero point) must fit one of the three granularities for x's shape."""
    s = ctx.tensor(1)
    zp = ctx.shape(2) if ctx.has(2) else None
    if zp is not None and s.shape is not None and zp != s.shape and not (
            _per_tensor(zp) and _per_tensor(s.shape)
    ):
        raise ctx.error(f"the zero point's shape {zp} differs from the scale's {s.shape}")
    block = ctx.attrs["block_size"]
    if block < 0:
        raise ctx.error(f"block_size must be positive, got {block}")
    if s.shape is None or x.shape is None or (_per_tensor(s.shape) and not block):
        return
    axis = ctx.axis(ctx.attrs["axis"], len(x.shape))
    if block:
        if len(s.shape) != len(x.shape):
            raise ctx.error(f"blocked quantization needs a scale of x's rank, got {s.shape} for {x.shape}")
        _check_blocks(ctx, x.shape, s.shape, axis, block)
    elif len(s.shape) == 1:
        n, d = s.shape[0], x.shape[axis]
        if isinstance(n, int) and isinstance(d, int) and n != d:
            raise ctx.error(f"a per-axis scale of {n} does not fit axis {axis} of {x.shape}")
    else:
        raise ctx.error(f"the scale must be a scalar or 1-D without block_size, got shape {s.shape}")


def _check_blocks(ctx: InferCtx, x: Shape, s: Shape, axis: int, block: int) -> None:
    for i, (a, b) in enumerate(zip(x, s)):
        if not (isinstance(a, int) and isinstance(b, int)):
            continue
        want = -(-a // block) if i == axis else a
        if b != want:
            raise ctx.error(f"a scale of shape {s} does not fit x {x} with block_size={block} on axis {axis}")


def expand_param(p: torch.Tensor, x: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """A scale or zero point broadcastable against x."""
    if p.numel() == 1 and p.ndim <= 1:
        return p.reshape(())
    axis = axis + x.ndim if axis < 0 else axis
    if not block:
        shape = [1] * x.ndim
        shape[axis] = p.numel()
        return p.reshape(shape)
    return p.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Values as float64 (exact for every quantized type; torch lacks some uint16/uint32 kernels)."""
    return t.to(torch.float64) if t.dtype != torch.float64 else t


# --- QuantizeLinear -----------------------------------------------------------------------------------


def _quant_dtype(ctx: InferCtx) -> DType:
    out = ctx.attrs["output_dtype"]
    if ctx.has(2):
        zp = ctx.dtype(2)
        if out is not None and out is not zp:
            raise ctx.error(f"output_dtype {out} differs from the zero point's type {zp}")
        out = zp
    out = out or D.UINT8
    if out not in QUANT_TYPES:
        raise ctx.error(f"cannot quantize to {out}")
    return out


def _q_infer(ctx: InferCtx) -> list[ValueType]:
    x = ctx.tensor(0)
    if x.dtype not in (*HIGH_TYPES, D.INT32):
        raise ctx.error(f"cannot quantize {x.dtype} input")
    if ctx.dtype(1) not in SCALE_TYPES:
        raise ctx.error(f"the scale must be a float type, got {ctx.dtype(1)}")
    _check_params(ctx, x)
    return [TensorType(_quant_dtype(ctx), x.shape)]


def _precision(c: RefCtx) -> torch.dtype:
    p = c.attrs["precision"] or c.node.inputs[1].dtype  # type: ignore[union-attr]
    return p.torch if p in (D.FLOAT32, D.FLOAT16, D.BFLOAT16, D.FLOAT64) else torch.float32


def to_float_type(v: torch.Tensor, dtype: DType, saturate: bool) -> torch.Tensor:
    """Round float values (through float32) to a float8/float6/float4 type (nearest even). Saturation clamps to
    the largest finite value; without it, overflow gives what the type has for it (inf or NaN)."""
    return round_to_float(v.to(torch.float32), dtype, saturate or dtype in NARROW_FLOATS)


def quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, out: DType, *, axis: int,
             block: int, saturate: bool, precision: torch.dtype) -> torch.Tensor:
    s = expand_param(scale, x, axis, block)
    q = x.to(precision) / s.to(precision)
    z = None if zp is None else expand_param(_wide(zp), x, axis, block)
    if out in INT_RANGES:
        v = _wide(torch.round(q))
        if z is not None:
            v = v + z
        lo, hi = INT_RANGES[out]
        return v.clamp(lo, hi).to(out.torch)
    v = _wide(q) if z is None else _wide(q) + z
    return to_float_type(v, out, saturate)


def _q_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    zp = xs[2] if len(xs) > 2 else None
    a = c.attrs
    return [quantize(xs[0], xs[1], zp, c.out_dtype(), axis=a["axis"], block=a["block_size"],
                     saturate=bool(a["saturate"]), precision=_precision(c))]


register(
    "QuantizeLinear", inputs=["x", "y_scale", "y_zero_point?"], outputs=["y"], infer=_q_infer, ref=_q_ref,
    attrs={
        "axis": Attr(AttrKind.INT, 1),
        "block_size": Attr(AttrKind.INT, 0),
        "output_dtype": Attr(AttrKind.DTYPE, None, doc="None: the zero point's type, else uint8"),
        "saturate": Attr(AttrKind.INT, 1, choices=(0, 1), doc="float8 results only"),
        "precision": Attr(AttrKind.DTYPE, None, doc="the division's type; None: the scale's"),
    },
    doc="y = saturate(round_half_even(x / scale) + zero_point); float types round to the type instead.",
)


# --- DequantizeLinear ---------------------------------------------------------------------------------


def _dq_infer(ctx: InferCtx) -> list[ValueType]:
    x = ctx.tensor(0)
    if x.dtype not in (*QUANT_TYPES, D.INT32):
        raise ctx.error(f"cannot dequantize {x.dtype} input")
    if ctx.has(2) and ctx.dtype(2) is not x.dtype:
        raise ctx.error(f"the zero point's type {ctx.dtype(2)} differs from x's {x.dtype}")
    _check_params(ctx, x)
    out = ctx.attrs["output_dtype"] or ctx.dtype(1)
    if out not in HIGH_TYPES:
        raise ctx.error(f"cannot dequantize to {out} (output_dtype, or the scale's type)")
    return [TensorType(out, x.shape)]


def dequantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, out: DType, *, axis: int,
               block: int) -> torch.Tensor:
    diff = _wide(x)
    if zp is not None:
        diff = diff - expand_param(_wide(zp), x, axis, block)
    compute = torch.float32
    return (diff.to(compute) * expand_param(scale.to(compute), x, axis, block)).to(out.torch)


def _dq_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    zp = xs[2] if len(xs) > 2 else None
    return [dequantize(xs[0], xs[1], zp, c.out_dtype(), axis=c.attrs["axis"], block=c.attrs["block_size"])]


register(
    "DequantizeLinear", inputs=["x", "x_scale", "x_zero_point?"], outputs=["y"], infer=_dq_infer, ref=_dq_ref,
    attrs={
        "axis": Attr(AttrKind.INT, 1),
        "block_size": Attr(AttrKind.INT, 0),
        "output_dtype": Attr(AttrKind.DTYPE, None, doc="None: the scale's type"),
    },
    doc="y = (x - zero_point) * scale.",
)


# --- DynamicQuantizeLinear ----------------------------------------------------------------------------


def _dyn_infer(ctx: InferCtx) -> list[ValueType]:
    if ctx.dtype(0) is not D.FLOAT32:
        raise ctx.error(f"the input must be float32, got {ctx.dtype(0)}")
    return [TensorType(D.UINT8, ctx.shape(0)), TensorType(D.FLOAT32, ()), TensorType(D.UINT8, ())]


def _dyn_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    lo = min(float(x.min()), 0.0) if x.numel() else 0.0
    hi = max(float(x.max()), 0.0) if x.numel() else 0.0
    # On x's device: CUDA divides by a CPU scalar as a multiplication by its reciprocal, which rounds differently.
    scale = torch.tensor((hi - lo) / 255, dtype=torch.float32, device=x.device)
    if float(scale) == 0:  # an all-zero input: every value quantizes to the zero point 0
        zero = torch.tensor(0, dtype=torch.uint8, device=x.device)
        return [torch.zeros(x.shape, dtype=torch.uint8, device=x.device), scale, zero]
    zp = torch.round(-torch.tensor(lo, dtype=torch.float32, device=x.device) / scale).clamp(0, 255).to(torch.uint8)
    y = quantize(x, scale, zp, D.UINT8, axis=0, block=0, saturate=True, precision=torch.float32)
    return [y, scale, zp]


register(
    "DynamicQuantizeLinear", inputs=["x"], outputs=["y", "y_scale", "y_zero_point"], infer=_dyn_infer,
    ref=_dyn_ref, doc="uint8 quantization with scale and zero point from the input's range (stretched to 0).",
)
