"""Op table entries: convolutions (Conv, ConvTranspose, ConvInteger, QLinearConv, DeformConv,
CausalConvWithState) and Col2Im, plus the sliding-window geometry that pooling shares.

Layouts are channels-first: X is (N, C, D1, ..., Dn), a Conv weight is (M, C/group, k1, ..., kn) and a
ConvTranspose weight is (C, M/group, k1, ..., kn). `pads` is [x1_begin, x2_begin, ..., x1_end, x2_end, ...].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import TensorType
from kiln.ir.ops.base import REQUIRED, Attr, AttrKind, InferCtx, RefCtx, register
from kiln.ir.ops.tensor import shape_values
from kiln.utils.errors import ExecutionError, UnsupportedError

AUTO_PAD = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
_SAME = ("SAME_UPPER", "SAME_LOWER")
FLOATS = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64)
_TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TORCH_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def window_attrs(*, kernel_required: bool = False, ceil_mode: bool = False) -> dict[str, Attr]:
    """The attributes every sliding-window op (conv, pool) shares."""
    attrs = {
        "auto_pad": Attr(AttrKind.STRING, "NOTSET", AUTO_PAD, "NOTSET: pads; SAME_*: out = ceil(in/stride)"),
        "dilations": Attr(AttrKind.INTS, None, doc="default 1 per spatial axis"),
        "kernel_shape": Attr(AttrKind.INTS, REQUIRED if kernel_required else None, doc="default: W's"),
        "pads": Attr(AttrKind.INTS, None, doc="[begins..., ends...], default 0"),
        "strides": Attr(AttrKind.INTS, None, doc="default 1 per spatial axis"),
    }
    if ceil_mode:
        attrs["ceil_mode"] = Attr(AttrKind.INT, 0, (0, 1), "ceil instead of floor for the output size")
    return attrs


# --- window geometry ----------------------------------------------------------------------------------


class Window:
    """Per-spatial-axis kernel, strides, dilations and explicit pads of one node, validated against n axes."""

    def __init__(self, attrs: dict[str, Any], n: int, kernel: Sequence[sym.Dim], fail: Any) -> None:
        self.n = n
        self.kernel = list(kernel)
        self.strides = _per_axis(attrs.get("strides"), n, 1, "strides", fail)
        self.dilations = _per_axis(attrs.get("dilations"), n, 1, "dilations", fail)
        pads = attrs.get("pads")
        if pads is None:
            pads = (0,) * (2 * n)
        if len(pads) != 2 * n:
            raise fail(f"pads has {len(pads)} values, {2 * n} expected for {n} spatial axes")
        if any(p < 0 for p in pads):
            raise fail(f"pads must be >= 0, got {list(pads)}")
        if any(s < 1 for s in self.strides) or any(d < 1 for d in self.dilations):
            raise fail(f"strides and dilations must be >= 1, got {self.strides} and {self.dilations}")
        self.pads = list(pads)
        self.auto_pad: str = attrs.get("auto_pad") or "NOTSET"
        self.ceil_mode = bool(attrs.get("ceil_mode", 0))

    def span(self, i: int) -> sym.Dim:
        """The dilated kernel extent along axis i."""
        return sym.add(sym.mul(sym.sub(self.kernel[i], 1), self.dilations[i]), 1)

    def out_dim(self, i: int, size: sym.Dim) -> sym.Dim | None:
        """Output size along spatial axis i; None when not expressible (the caller makes a fresh dim)."""
        s, dk = self.strides[i], self.span(i)
        if self.auto_pad in _SAME:
            return sym.ceildiv(size, s)
        if self.auto_pad == "VALID":
            return sym.add(sym.floordiv(sym.sub(size, dk), s), 1)
        pb, pe = self.pads[i], self.pads[i + self.n]
        a = sym.sub(sym.add(size, pb + pe), dk)
        if not self.ceil_mode:
            return sym.add(sym.floordiv(a, s), 1)
        out = sym.add(sym.ceildiv(a, s), 1)
        # A last window that would start in the end padding is dropped: (out-1)*s >= size + pb.
        if isinstance(out, int) and isinstance(size, int):
            return out - 1 if (out - 1) * s >= size + pb else out
        if not isinstance(dk, int):
            return None
        if dk - pe <= 0:
            return sym.sub(out, 1)
        return out if dk - pe > s - 1 else None

    def runtime_pads(self, sizes: Sequence[int]) -> list[tuple[int, int]]:
        """(begin, end) padding per axis for concrete input sizes (auto_pad resolved)."""
        out = []
        for i, size in enumerate(sizes):
            if self.auto_pad == "VALID":
                out.append((0, 0))
            elif self.auto_pad in _SAME:
                s, dk = self.strides[i], int(self.span(i))
                total = max(0, (-(-size // s) - 1) * s + dk - size)
                small, big = total // 2, total - total // 2
                out.append((small, big) if self.auto_pad == "SAME_UPPER" else (big, small))
            else:
                out.append((self.pads[i], self.pads[i + self.n]))
        return out

    def out_sizes(self, sizes: Sequence[int]) -> list[int]:
        outs = [self.out_dim(i, d) for i, d in enumerate(sizes)]
        if any(not isinstance(o, int) or o < 1 for o in outs):
            raise ExecutionError(f"input spatial shape {list(sizes)} is too small for kernel {self.kernel} "
                                 f"(output {outs})")
        return [int(o) for o in outs]  # type: ignore[arg-type]


def _per_axis(v: Sequence[int] | None, n: int, default: int, name: str, fail: Any) -> list[int]:
    if v is None:
        return [default] * n
    if len(v) != n:
        raise fail(f"{name} has {len(v)} values, {n} expected for {n} spatial axes")
    return list(v)


def spatial_out(ctx: InferCtx, win: Window, sizes: Sequence[sym.Dim]) -> list[sym.Dim]:
    """Output spatial dims for inference: expressions where possible, fresh dims otherwise."""
    out: list[sym.Dim] = []
    for i, size in enumerate(sizes):
        d = win.out_dim(i, size) if all(isinstance(k, int) for k in win.kernel) else None
        if isinstance(d, int) and d < 1:
            raise ctx.error(f"spatial axis {i}: input size {size} is too small for kernel {win.kernel[i]} "
                            f"(stride {win.strides[i]}, dilation {win.dilations[i]}, pads {win.pads}) "
                            f"-> output size {d}")
        out.append(ctx.fresh("out") if d is None else d)
    return out


def pad_nd(x: torch.Tensor, pads: Sequence[tuple[int, int]], value: float = 0.0) -> torch.Tensor:
    """Pad (or crop, for negative amounts) the trailing len(pads) axes of x."""
    if all(p == (0, 0) for p in pads):
        return x
    flat: list[int] = []
    for b, e in reversed(pads):
        flat += [b, e]
    return F.pad(x, flat, mode="constant", value=value)


# --- shared inference ---------------------------------------------------------------------------------


def _spatial_rank(ctx: InferCtx, *inputs: int) -> int | None:
    for i in inputs:
        if ctx.has(i) and ctx.rank(i) is not None:
            r = ctx.rank(i)
            assert r is not None
            if r < 3:
                raise ctx.error(f"input {i} must have rank >= 3 (N, C, spatial...), got rank {r}")
            return r - 2
    return None


def _kernel(ctx: InferCtx, w_index: int, n: int) -> list[sym.Dim]:
    ks = ctx.attrs.get("kernel_shape")
    if ks is not None:
        if len(ks) != n:
            raise ctx.error(f"kernel_shape has {len(ks)} values, {n} expected")
        return list(ks)
    w = ctx.shape(w_index)
    if w is None:
        return [ctx.fresh("k") for _ in range(n)]
    return list(w[2:])


def _dim(shape: Sequence[sym.Dim] | None, i: int, ctx: InferCtx, hint: str) -> sym.Dim:
    return shape[i] if shape is not None else ctx.fresh(hint)


def _check_group(ctx: InferCtx, c_in: sym.Dim | None, w_c: sym.Dim | None, m: sym.Dim | None,
                 group: int) -> None:
    if group < 1:
        raise ctx.error(f"group must be >= 1, got {group}")
    if isinstance(c_in, int) and isinstance(w_c, int) and c_in != w_c * group:
        raise ctx.error(f"input has {c_in} channels but the weight expects {w_c} x group {group}")
    if isinstance(m, int) and m % group:
        raise ctx.error(f"{m} output channels are not divisible by group {group}")


def _same_dtype(ctx: InferCtx, *inputs: int) -> DType:
    dt = ctx.dtype(inputs[0])
    for i in inputs[1:]:
        if ctx.has(i) and ctx.dtype(i) != dt:
            raise ctx.error(f"input {i} is {ctx.dtype(i)}, input {inputs[0]} is {dt}; they must match")
    return dt


def _float_only(ctx: InferCtx, dt: DType) -> None:
    if dt not in FLOATS:
        raise UnsupportedError(f"element type {dt} is not supported (float16/bfloat16/float32/float64 only)",
                               op=ctx.node.op, node=ctx.node.name)


# --- Conv ---------------------------------------------------------------------------------------------


def _conv_infer(ctx: InferCtx) -> list[TensorType]:
    dt = _same_dtype(ctx, 0, 1, 2)
    _float_only(ctx, dt)
    shape = _conv_shape(ctx)
    _check_bias(ctx, 2, shape[1] if shape is not None else None)
    return [TensorType(dt, shape)]


def _check_bias(ctx: InferCtx, i: int, channels: sym.Dim | None) -> None:
    b = ctx.shape(i) if ctx.has(i) else None
    if b is None:
        return
    if len(b) != 1 or (isinstance(b[0], int) and isinstance(channels, int) and b[0] != channels):
        raise ctx.error(f"the bias must have shape [{channels}] (one per output channel), got {list(b)}")


def _conv_shape(ctx: InferCtx, w_index: int = 1) -> tuple[sym.Dim, ...] | None:
    n = _spatial_rank(ctx, 0, w_index)
    if n is None:
        return None
    x, w = ctx.shape(0), ctx.shape(w_index)
    if x is not None and w is not None and len(x) != len(w):
        raise ctx.error(f"input has rank {len(x)} but the weight has rank {len(w)}")
    win = Window(ctx.attrs, n, _kernel(ctx, w_index, n), ctx.error)
    wk = tuple(w[2:]) if w is not None and ctx.attrs.get("kernel_shape") is not None else None
    if wk is not None and all(isinstance(d, int) for d in wk) and wk != tuple(win.kernel):
        raise ctx.error(f"kernel_shape {win.kernel} does not match the weight's dims {list(wk)}")
    m = _dim(w, 0, ctx, "m")
    _check_group(ctx, x[1] if x else None, w[1] if w else None, m, ctx.attrs["group"])
    sizes = list(x[2:]) if x is not None else [ctx.fresh("in") for _ in range(n)]
    return (_dim(x, 0, ctx, "n"), m, *spatial_out(ctx, win, sizes))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the reference computes in: float64 stays, everything else goes through float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def conv_nd(x: torch.Tensor, w: torch.Tensor, strides: Sequence[int], dilations: Sequence[int],
            groups: int, pads: Sequence[tuple[int, int]], bias: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-correlation of x (N, C, *S) with w (M, C/groups, *K), plus bias (M); any number of axes."""
    n = x.dim() - 2
    if n <= 3:
        symmetric = all(b == e for b, e in pads)
        if not symmetric:
            x = pad_nd(x, pads)
        padding = [b for b, _ in pads] if symmetric else 0
        return _TORCH_CONV[n](x, w, bias, list(strides), padding, list(dilations), groups)
    # More than 3 spatial axes: sum, over the first kernel axis, (n-1)-D convolutions of strided slices.
    x = pad_nd(x, pads)
    k0, s0, d0 = w.shape[2], strides[0], dilations[0]
    out0 = (x.shape[2] - ((k0 - 1) * d0 + 1)) // s0 + 1
    total: torch.Tensor | None = None
    for k in range(k0):
        start = k * d0
        xs = x[:, :, start:start + (out0 - 1) * s0 + 1:s0]  # (N, C, out0, ...)
        xs = xs.movedim(2, 1).reshape(-1, x.shape[1], *x.shape[3:])
        y = conv_nd(xs, w[:, :, k], strides[1:], dilations[1:], groups, [(0, 0)] * (n - 1))
        y = y.reshape(x.shape[0], out0, *y.shape[1:]).movedim(1, 2)
        total = y if total is None else total + y
    assert total is not None
    return total if bias is None else total + bias.reshape(1, -1, *([1] * n))


def _conv_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, w, b = xs[0], xs[1], xs[2] if len(xs) > 2 else None
    win = Window(c.attrs, x.dim() - 2, list(w.shape[2:]), _ref_fail(c))
    cd = compute_dtype(x)
    pads = win.runtime_pads(list(x.shape[2:]))
    bias = None if b is None else b.to(cd)
    return [conv_nd(x.to(cd), w.to(cd), win.strides, win.dilations, c.attrs["group"], pads, bias).to(x.dtype)]


def _ref_fail(c: RefCtx) -> Any:
    return lambda msg: ExecutionError(f"node '{c.node.name}' ({c.node.op}): {msg}")


_CONV_ATTRS = {**window_attrs(), "group": Attr(AttrKind.INT, 1, doc="number of channel groups")}

register(
    "Conv", inputs=["X", "W", "B?"], outputs=["Y"], attrs=_CONV_ATTRS, infer=_conv_infer, ref=_conv_ref,
    doc="N-D convolution (cross-correlation) with groups, strides, dilations and padding.",
)


# --- ConvTranspose ------------------------------------------------------------------------------------


def _convt_attrs() -> dict[str, Attr]:
    return {
        **_CONV_ATTRS,
        "output_padding": Attr(AttrKind.INTS, None, doc="extra output elements at the end of each axis"),
        "output_shape": Attr(AttrKind.INTS, None, doc="spatial output shape; pads are derived from it"),
    }


def _convt_geometry(attrs: dict[str, Any], n: int, kernel: Sequence[sym.Dim], fail: Any
                    ) -> tuple[Window, list[int]]:
    win = Window(attrs, n, kernel, fail)
    op = _per_axis(attrs.get("output_padding"), n, 0, "output_padding", fail)
    return win, op


def _explicit_out_shape(attrs: dict[str, Any], n: int, fail: Any) -> list[int] | None:
    shape = attrs.get("output_shape")
    if shape is None:
        return None
    if len(shape) == n + 2:  # some exporters include N and C
        shape = shape[2:]
    if len(shape) != n:
        raise fail(f"output_shape has {len(shape)} values, {n} expected")
    return list(shape)


def _convt_infer(ctx: InferCtx) -> list[TensorType]:
    dt = _same_dtype(ctx, 0, 1, 2)
    _float_only(ctx, dt)
    n = _spatial_rank(ctx, 0, 1)
    if n is None:
        return [TensorType(dt, None)]
    if n > 3:
        raise UnsupportedError(f"ConvTranspose with {n} spatial axes is not supported (1 to 3)",
                               op=ctx.node.op, node=ctx.node.name)
    x, w = ctx.shape(0), ctx.shape(1)
    win, op = _convt_geometry(ctx.attrs, n, _kernel(ctx, 1, n), ctx.error)
    group = ctx.attrs["group"]
    _check_group(ctx, x[1] if x else None, w[0] if w else None, None, 1)
    m = sym.mul(w[1], group) if w is not None else ctx.fresh("m")
    fixed = _explicit_out_shape(ctx.attrs, n, ctx.error)
    spatial: list[sym.Dim] = []
    for i in range(n):
        size = x[i + 2] if x is not None else ctx.fresh("in")
        if fixed is not None:
            spatial.append(fixed[i])
        elif win.auto_pad in _SAME:
            spatial.append(sym.mul(size, win.strides[i]))
        elif not isinstance(win.kernel[i], int):
            spatial.append(ctx.fresh("out"))
        else:
            pb, pe = (0, 0) if win.auto_pad == "VALID" else (win.pads[i], win.pads[i + n])
            full = sym.add(sym.mul(sym.sub(size, 1), win.strides[i]), win.span(i))
            spatial.append(sym.sub(sym.add(full, op[i]), pb + pe))
    _check_bias(ctx, 2, m)
    return [TensorType(dt, (_dim(x, 0, ctx, "n"), m, *spatial))]


def _convt_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, w, b = xs[0], xs[1], xs[2] if len(xs) > 2 else None
    n = x.dim() - 2
    win, op = _convt_geometry(c.attrs, n, list(w.shape[2:]), _ref_fail(c))
    fixed = _explicit_out_shape(c.attrs, n, _ref_fail(c))
    cd = compute_dtype(x)
    full = _TORCH_CONV_T[n](x.to(cd), w.to(cd), None, list(win.strides), 0, 0, c.attrs["group"],
                            list(win.dilations))
    crops = []
    for i in range(n):
        size, s, dk = x.shape[i + 2], win.strides[i], int(win.span(i))
        natural = s * (size - 1) + op[i] + dk
        if fixed is not None or win.auto_pad in _SAME:
            out = fixed[i] if fixed is not None else size * s
            total = natural - out
            # An output larger than the natural size (negative total) keeps the start and grows at the end.
            pb = max(0, total // 2 if win.auto_pad == "SAME_UPPER" else total - total // 2)
        else:
            pb, pe = (0, 0) if win.auto_pad == "VALID" else (win.pads[i], win.pads[i + n])
            out = natural - pb - pe
        crops.append((-pb, out + pb - full.shape[i + 2]))
    y = pad_nd(full, crops)
    if b is not None:
        y = y + b.to(cd).reshape(1, -1, *([1] * n))
    return [y.to(x.dtype)]


register(
    "ConvTranspose", inputs=["X", "W", "B?"], outputs=["Y"], attrs=_convt_attrs(), infer=_convt_infer,
    ref=_convt_ref,
    doc="Transposed convolution (1 to 3 spatial axes). With `output_shape` (or SAME_* auto_pad) the total "
        "padding is derived from the output size and split per auto_pad: SAME_UPPER puts the odd element at "
        "the end, otherwise at the beginning; an output larger than the natural size extends at the end.",
)


# --- integer convolutions -----------------------------------------------------------------------------

_INT8 = (DType.INT8, DType.UINT8)


def _zero_point(z: torch.Tensor | None, dim: int, ndim: int) -> torch.Tensor | float:
    """A zero point as a float64 broadcastable along `dim` of an ndim tensor (scalar or per-channel)."""
    if z is None:
        return 0.0
    z = z.to(torch.float64).reshape(-1)
    if z.numel() == 1:
        return z.reshape(())
    shape = [1] * ndim
    shape[dim] = z.numel()
    return z.reshape(shape)


def _int_conv(c: RefCtx, x: torch.Tensor, xz: Any, w: torch.Tensor, wz: Any) -> torch.Tensor:
    """sum((x - xz) * (w - wz)) in float64 (exact for 8-bit inputs), zero-padded after the shift."""
    xf = x.to(torch.float64) - _zero_point(xz, 1, x.dim())
    wf = w.to(torch.float64) - _zero_point(wz, 0, w.dim())
    win = Window(c.attrs, x.dim() - 2, list(w.shape[2:]), _ref_fail(c))
    pads = win.runtime_pads(list(x.shape[2:]))
    return conv_nd(xf, wf, win.strides, win.dilations, c.attrs["group"], pads)


def _check_zero_point(ctx: InferCtx, i: int, what: str, per_channel: sym.Dim | None = None) -> None:
    if not ctx.has(i):
        return
    s = ctx.shape(i)
    if s is None or not all(isinstance(d, int) for d in s):
        return
    numel = sym.prod(s)
    if numel != 1 and (per_channel is None or numel != per_channel or len(s) != 1):
        extra = " or have one value per output channel" if per_channel else ""
        raise ctx.error(f"{what} must be a scalar{extra}, got shape {list(s)}")


def _conv_integer_infer(ctx: InferCtx) -> list[TensorType]:
    for i in (0, 1):
        if ctx.dtype(i) not in _INT8:
            raise ctx.error(f"input {i} must be int8 or uint8, got {ctx.dtype(i)}")
    w = ctx.shape(1)
    _check_zero_point(ctx, 2, "x_zero_point")
    _check_zero_point(ctx, 3, "w_zero_point", w[0] if w else None)
    return [TensorType(DType.INT32, _conv_shape(ctx))]


def _conv_integer_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, w = xs[0], xs[1]
    xz, wz = (xs[2] if len(xs) > 2 else None), (xs[3] if len(xs) > 3 else None)
    return [_int_conv(c, x, xz, w, wz).round().to(torch.int32)]


register(
    "ConvInteger", inputs=["x", "w", "x_zero_point?", "w_zero_point?"], outputs=["y"], attrs=_CONV_ATTRS,
    infer=_conv_integer_infer, ref=_conv_integer_ref,
    doc="Integer convolution: int32 sum of (x - x_zero_point) * (w - w_zero_point); w_zero_point may be "
        "per output channel.",
)


def _qlinear_conv_infer(ctx: InferCtx) -> list[TensorType]:
    for i, what in ((0, "x"), (3, "w"), (2, "x_zero_point"), (5, "w_zero_point"), (7, "y_zero_point")):
        if ctx.dtype(i) not in _INT8:
            raise ctx.error(f"{what} must be int8 or uint8, got {ctx.dtype(i)}")
    if ctx.dtype(2) != ctx.dtype(0) or ctx.dtype(5) != ctx.dtype(3):
        raise ctx.error("zero points must have the type of the tensor they belong to")
    if ctx.has(8) and ctx.dtype(8) != DType.INT32:
        raise ctx.error(f"B must be int32, got {ctx.dtype(8)}")
    w = ctx.shape(3)
    m = w[0] if w else None
    _check_zero_point(ctx, 2, "x_zero_point")
    _check_zero_point(ctx, 1, "x_scale")
    _check_zero_point(ctx, 5, "w_zero_point", m)
    _check_zero_point(ctx, 4, "w_scale", m)
    _check_zero_point(ctx, 6, "y_scale")
    _check_zero_point(ctx, 7, "y_zero_point")
    shape = _conv_shape(ctx, w_index=3)
    _check_bias(ctx, 8, shape[1] if shape is not None else None)
    return [TensorType(ctx.dtype(7), shape)]


def _qlinear_conv_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, xs_, xz, w, ws, wz, ys, yz = xs[:8]
    b = xs[8] if len(xs) > 8 else None
    acc = _int_conv(c, x, xz, w, wz)
    if b is not None:
        acc = acc + b.to(torch.float64).reshape(1, -1, *([1] * (acc.dim() - 2)))
    # The requantization multiplier is formed in float32, as ONNX runtimes do.
    f32 = [t.to(torch.float32).reshape(-1) for t in (xs_, ws, ys)]
    mult = (f32[0] * f32[1] / f32[2]).to(torch.float64)
    mult = mult.reshape(()) if mult.numel() == 1 else mult.reshape(1, -1, *([1] * (acc.dim() - 2)))
    info = torch.iinfo(yz.dtype)
    y = torch.round(acc * mult) + yz.to(torch.float64).reshape(())
    return [y.clamp(info.min, info.max).to(yz.dtype)]


register(
    "QLinearConv",
    inputs=["x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale", "y_zero_point", "B?"],
    outputs=["y"], attrs=_CONV_ATTRS, infer=_qlinear_conv_infer, ref=_qlinear_conv_ref,
    doc="Quantized convolution: y = saturate(round(acc * x_scale * w_scale / y_scale) + y_zero_point), "
        "acc = sum((x - x_zero_point) * (w - w_zero_point)) + B (int32). w_scale/w_zero_point may be per "
        "output channel. Rounding is half to even.",
)


# --- DeformConv ---------------------------------------------------------------------------------------


def _deform_infer(ctx: InferCtx) -> list[TensorType]:
    dt = _same_dtype(ctx, 0, 1, 2, 3, 4)
    _float_only(ctx, dt)
    n = _spatial_rank(ctx, 0, 1, 2)
    if n is None:
        return [TensorType(dt, None)]
    x, w, off = ctx.shape(0), ctx.shape(1), ctx.shape(2)
    win = Window(ctx.attrs, n, _kernel(ctx, 1, n), ctx.error)
    m = _dim(w, 0, ctx, "m")
    _check_group(ctx, x[1] if x else None, w[1] if w else None, m, ctx.attrs["group"])
    g = ctx.attrs["offset_group"]
    if g < 1:
        raise ctx.error(f"offset_group must be >= 1, got {g}")
    if off is not None and all(isinstance(k, int) for k in win.kernel) and isinstance(off[1], int):
        want = g * sym.prod(win.kernel) * n
        if off[1] != want:
            raise ctx.error(f"offset has {off[1]} channels, offset_group*prod(kernel)*{n} = {want} expected")
    _check_bias(ctx, 3, m)
    if x is not None:
        spatial = spatial_out(ctx, win, list(x[2:]))
    elif off is not None:
        spatial = list(off[2:])
    else:
        spatial = [ctx.fresh("out") for _ in range(n)]
    return [TensorType(dt, (_dim(x, 0, ctx, "n"), m, *spatial))]


def sample_linear_zeros(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """N-linear interpolation of x (B, C, *S) at pixel coordinates coords (B, P, n) (axis order of S);
    corners outside the input read as zero. Returns (B, C, P)."""
    bsz, ch = x.shape[:2]
    size = list(x.shape[2:])
    n = len(size)
    flat = x.reshape(bsz, ch, -1)
    lo = torch.floor(coords)
    frac = coords - lo
    lo = lo.to(torch.int64)
    out = x.new_zeros(bsz, ch, coords.shape[1])
    for corner in range(1 << n):
        idx = torch.zeros(bsz, coords.shape[1], dtype=torch.int64, device=x.device)
        weight = x.new_ones(bsz, coords.shape[1])
        valid = torch.ones(bsz, coords.shape[1], dtype=torch.bool, device=x.device)
        for d in range(n):
            up = (corner >> (n - 1 - d)) & 1
            i = lo[..., d] + up
            weight = weight * (frac[..., d] if up else 1 - frac[..., d])
            valid &= (i >= 0) & (i < size[d])
            idx = idx * size[d] + i.clamp(0, size[d] - 1)
        vals = torch.gather(flat, 2, idx[:, None, :].expand(bsz, ch, -1))
        out += vals * (weight * valid)[:, None, :]
    return out


def _deform_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, w, offset = xs[0], xs[1], xs[2]
    b = xs[3] if len(xs) > 3 else None
    mask = xs[4] if len(xs) > 4 else None
    cd = compute_dtype(x)
    n = x.dim() - 2
    kernel = list(w.shape[2:])
    win = Window(c.attrs, n, kernel, _ref_fail(c))
    pads = win.runtime_pads(list(x.shape[2:]))
    outs = win.out_sizes(list(x.shape[2:]))
    bsz, ch = x.shape[:2]
    g, group, m = c.attrs["offset_group"], c.attrs["group"], w.shape[0]
    k = math.prod(kernel)
    npos = math.prod(outs)
    # Sampling positions: output position * stride - pad_begin + kernel offset * dilation + learned offset.
    grids = torch.meshgrid(*[torch.arange(o, dtype=cd, device=x.device) for o in outs], indexing="ij")
    base = torch.stack([gr.reshape(-1) * win.strides[i] - pads[i][0] for i, gr in enumerate(grids)], -1)
    kgrids = torch.meshgrid(*[torch.arange(kk, dtype=cd, device=x.device) for kk in kernel], indexing="ij")
    kpos = torch.stack([kg.reshape(-1) * win.dilations[i] for i, kg in enumerate(kgrids)], -1)
    off = offset.to(cd).reshape(bsz, g, k, n, npos).permute(0, 1, 2, 4, 3)  # (N, G, K, P, n)
    coords = base[None, None, None] + kpos[None, None, :, None] + off
    xg = x.to(cd).reshape(bsz * g, ch // g, *x.shape[2:])
    cols = sample_linear_zeros(xg, coords.reshape(bsz * g, k * npos, n))  # (N*G, C/G, K*P)
    cols = cols.reshape(bsz, g, ch // g, k, npos)
    if mask is not None:
        cols = cols * mask.to(cd).reshape(bsz, g, 1, k, npos)
    cols = cols.reshape(bsz, group, (ch // group) * k, npos)
    wg = w.to(cd).reshape(group, m // group, (ch // group) * k)
    y = torch.einsum("gmk,bgkp->bgmp", wg, cols).reshape(bsz, m, *outs)
    if b is not None:
        y = y + b.to(cd).reshape(1, -1, *([1] * n))
    return [y.to(x.dtype)]


register(
    "DeformConv", inputs=["X", "W", "offset", "B?", "mask?"], outputs=["Y"],
    attrs={k: v for k, v in _CONV_ATTRS.items() if k != "auto_pad"}
    | {"offset_group": Attr(AttrKind.INT, 1, doc="groups of input channels sharing one offset field")},
    infer=_deform_infer, ref=_deform_ref,
    doc="Deformable convolution: each kernel tap samples X (N-linearly, zero outside) at its position plus a "
        "learned offset, optionally scaled by a mask.",
)


# --- CausalConvWithState ------------------------------------------------------------------------------


def _causal_infer(ctx: InferCtx) -> list[TensorType]:
    dt = _same_dtype(ctx, 0, 1, 2, 3)
    _float_only(ctx, dt)
    x, w = ctx.shape(0), ctx.shape(1)
    for i, s in ((0, x), (1, w)):
        if s is not None and len(s) != 3:
            raise ctx.error(f"input {i} must have rank 3, got {len(s)}")
    if w is not None and w[1] != 1:
        raise ctx.error(f"weight must be (channels, 1, k), got {list(w)}")
    if x is not None and w is not None and sym.equal(x[1], w[0]) is False:
        raise ctx.error(f"input has {x[1]} channels, the weight {w[0]}")
    k = w[2] if w is not None else ctx.fresh("k")
    state: tuple[sym.Dim, ...] = (_dim(x, 0, ctx, "b"), _dim(x, 1, ctx, "c"), sym.sub(k, 1))
    return [TensorType(dt, x), TensorType(dt, state)]


def _causal_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    past = xs[3] if len(xs) > 3 else None
    k = w.shape[2]
    if past is None:
        past = x.new_zeros(x.shape[0], x.shape[1], k - 1)
    padded = torch.cat([past, x], dim=2)
    cd = compute_dtype(x)
    y = F.conv1d(padded.to(cd), w.to(cd), None if b is None else b.to(cd), groups=x.shape[1]).to(x.dtype)
    if c.attrs["activation"] in ("silu", "swish"):
        y = F.silu(y.to(cd)).to(x.dtype)
    return [y, padded[:, :, padded.shape[2] - (k - 1):].clone()]


register(
    "CausalConvWithState", inputs=["input", "weight", "bias?", "past_state?"],
    outputs=["output", "present_state"],
    attrs={"activation": Attr(AttrKind.STRING, "none", ("none", "silu", "swish"))},
    infer=_causal_infer, ref=_causal_ref,
    doc="Causal depthwise 1-D convolution over (B, C, L) with a carried (B, C, k-1) state of past inputs.",
)


# --- Col2Im -------------------------------------------------------------------------------------------


def _col2im_infer(ctx: InferCtx) -> list[TensorType]:
    dt = ctx.dtype(0)
    if dt is DType.STRING:
        raise UnsupportedError("Col2Im on strings is not supported", op=ctx.node.op, node=ctx.node.name)
    for i in (1, 2):
        if ctx.dtype(i) != DType.INT64:
            raise ctx.error(f"input {i} must be int64, got {ctx.dtype(i)}")
    image, block = shape_values(ctx.value(1)), ctx.const_ints(2)
    n = len(image) if image is not None else len(block) if block is not None else None
    if n is None:
        s = ctx.shape(1)
        n = s[0] if s is not None and isinstance(s[0], int) else None
    x = ctx.shape(0)
    if x is not None and len(x) != 3:
        raise ctx.error(f"input must be (N, C*prod(block_shape), L), got rank {len(x)}")
    if n is None:
        return [TensorType(dt, None)]
    spatial = list(image) if image is not None else [ctx.fresh("img") for _ in range(n)]
    ch: sym.Dim = ctx.fresh("c")
    if x is not None and block is not None:
        kk = int(sym.prod(block))
        if isinstance(x[1], int) and x[1] % kk:
            raise ctx.error(f"input dim 1 ({x[1]}) is not divisible by prod(block_shape) = {kk}")
        ch = sym.floordiv(x[1], kk)
    return [TensorType(dt, (_dim(x, 0, ctx, "n"), ch, *spatial))]


def _col2im_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, image, block = xs[0], [int(v) for v in xs[1].tolist()], [int(v) for v in xs[2].tolist()]
    n = len(image)
    win = Window(c.attrs, n, block, _ref_fail(c))
    pads = [(win.pads[i], win.pads[i + n]) for i in range(n)]
    blocks = [(image[i] + sum(pads[i]) - int(win.span(i))) // win.strides[i] + 1 for i in range(n)]
    k = math.prod(block)
    nb, ch = x.shape[0], x.shape[1] // max(k, 1)
    if x.shape[1] != ch * k or x.shape[2] != math.prod(blocks):
        raise ExecutionError(f"node '{c.node.name}' (Col2Im): input shape {list(x.shape)} does not match "
                             f"block_shape {block} over image {image} ({blocks} blocks)")
    # Image position of (kernel offset, block position) along each axis; out of range -> dropped.
    dev = x.device
    idx = torch.zeros(k, 1, dtype=torch.int64, device=dev)
    valid = torch.ones(k, 1, dtype=torch.bool, device=dev)
    kg = torch.meshgrid(*[torch.arange(b, device=dev) for b in block], indexing="ij")
    bg = torch.meshgrid(*[torch.arange(b, device=dev) for b in blocks], indexing="ij")
    for i in range(n):
        pos = kg[i].reshape(-1, 1) * win.dilations[i] + bg[i].reshape(1, -1) * win.strides[i] - pads[i][0]
        valid = valid & (pos >= 0) & (pos < image[i])
        idx = idx * image[i] + pos.clamp(0, image[i] - 1)
    wide = _accumulate_dtype(x.dtype)
    src = x.to(wide).reshape(nb, ch, -1) * valid.reshape(1, 1, -1)
    out = torch.zeros(nb, ch, math.prod(image), dtype=wide, device=dev)
    out.scatter_add_(2, idx.reshape(1, 1, -1).expand(nb, ch, -1), src)
    if x.dtype == torch.bool:
        return [(out != 0).reshape(nb, ch, *image)]
    return [out.to(x.dtype).reshape(nb, ch, *image)]


def _accumulate_dtype(dt: torch.dtype) -> torch.dtype:
    if dt.is_complex:
        return torch.complex128
    if dt.is_floating_point:
        return torch.float64 if dt == torch.float64 else torch.float32
    return torch.int64 if dt != torch.uint64 else torch.float64


register(
    "Col2Im", inputs=["input", "image_shape", "block_shape"], outputs=["output"],
    attrs={k: window_attrs()[k] for k in ("dilations", "pads", "strides")},
    infer=_col2im_infer, ref=_col2im_ref,
    doc="Rearranges (N, C*prod(block), L) column blocks into an (N, C, *image_shape) image (overlaps add).",
)
