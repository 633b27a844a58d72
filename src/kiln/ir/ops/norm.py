"""Op table entries: softmax family and normalizations.

Softmax, LogSoftmax and Hardmax work along one axis (ONNX opset 13 semantics; the importer lowers the older
2-D coercing versions); (Log)Softmax rounds its intermediates as its ONNX function body does. The
normalizations compute their statistics ("stage one") in the precision `stash_type` names where ONNX has that
attribute, and in float32 for half-precision inputs otherwise; the affine step runs in the input's dtype.
Variances are population variances (divided by the element count)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Shape, TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register
from kiln.ir.ops.reduce import check_dtype, float_compute

_STASH = (DType.FLOAT32, DType.FLOAT64, DType.FLOAT16, DType.BFLOAT16)
_EPS = Attr(AttrKind.FLOAT, 1e-5)


def _axis(ctx: InferCtx, i: int = 0) -> int | None:
    """The `axis` attribute normalized against input i's rank (None when the rank is unknown)."""
    rank = ctx.rank(i)
    if rank is None:
        return None
    return ctx.axis(ctx.attrs["axis"], rank)


def _ref_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _float_same(ctx: InferCtx) -> list[TensorType]:
    """One output of input 0's type, after checking the input is a float tensor and `axis` fits its rank."""
    check_dtype(ctx, 0, ints=False)
    _axis(ctx)
    return [ctx.tensor(0)]


def _static_mismatch(a: sym.Dim, b: sym.Dim) -> bool:
    return isinstance(a, int) and isinstance(b, int) and a != b


def _check_vector(ctx: InferCtx, i: int, length: sym.Dim | None, what: str) -> None:
    """Input i, when its shape is known, must be a 1-D tensor of `length` elements."""
    shape = ctx.shape(i)
    if shape is None or length is None:
        return
    if len(shape) != 1 or _static_mismatch(shape[0], length):
        raise ctx.error(f"{what} must have shape [{length}], got {list(shape)}")


def _check_unidirectional(ctx: InferCtx, i: int, target: Shape | None, what: str) -> None:
    """Input i must broadcast to `target` without changing it (ONNX unidirectional broadcasting)."""
    shape = ctx.shape(i)
    if shape is None or target is None:
        return
    if len(shape) > len(target):
        raise ctx.error(f"{what} of shape {list(shape)} does not broadcast to {list(target)}")
    for d, t in zip(reversed(shape), reversed(target)):
        if d != 1 and _static_mismatch(d, t):
            raise ctx.error(f"{what} of shape {list(shape)} does not broadcast to {list(target)}")


def _channel_view(t: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along axis 1 of a rank-`rank` tensor."""
    if rank < 2:
        return t.to(dtype).reshape(-1)
    return t.to(dtype).reshape([1, -1] + [1] * (rank - 2))


# --- softmax family -----------------------------------------------------------------------------------


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a compute-precision intermediate to `dtype` (and back), as an op producing `dtype` would."""
    return t.to(dtype).to(t.dtype) if dtype != t.dtype else t


def softmax_steps(x: torch.Tensor, axis: int, *, log: bool) -> torch.Tensor:
    """(Log)Softmax as ONNX's function body computes it: max, Sub, Exp, ReduceSum, then Div (or Log, Sub),
    each step's result in x's dtype. Half types round where the body rounds (sums accumulate in float32)."""
    w = float_compute(x)
    shifted = _in_dtype(w - w.amax(dim=axis, keepdim=True), x.dtype) if x.numel() else w
    e = _in_dtype(torch.exp(shifted), x.dtype)
    total = _in_dtype(e.sum(dim=axis, keepdim=True), x.dtype)
    if log:
        return (shifted - _in_dtype(torch.log(total), x.dtype)).to(x.dtype)
    return (e / total).to(x.dtype)


def _softmax_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    return [softmax_steps(x, _ref_axis(c.attrs["axis"], x.dim()), log=False)]


def _log_softmax_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    return [softmax_steps(x, _ref_axis(c.attrs["axis"], x.dim()), log=True)]


def _hardmax_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    axis = _ref_axis(c.attrs["axis"], x.dim())
    out = torch.zeros_like(x)
    if x.numel() == 0:
        return [out]
    # torch.argmax returns the first of equal maxima, as ONNX requires.
    idx = torch.argmax(float_compute(x), dim=axis, keepdim=True)
    return [out.scatter_(axis, idx, 1)]


_AXIS_LAST = {"axis": Attr(AttrKind.INT, -1)}
register("Softmax", inputs=["input"], outputs=["output"], attrs=dict(_AXIS_LAST), infer=_float_same,
         ref=_softmax_ref, doc="exp(x) / sum(exp(x)) along `axis` (ONNX 13 semantics).")
register("LogSoftmax", inputs=["input"], outputs=["output"], attrs=dict(_AXIS_LAST), infer=_float_same,
         ref=_log_softmax_ref, doc="log(softmax(x)) along `axis` (ONNX 13 semantics).")
register("Hardmax", inputs=["input"], outputs=["output"], attrs=dict(_AXIS_LAST), infer=_float_same,
         ref=_hardmax_ref, doc="1 at the first maximum along `axis`, 0 elsewhere (ONNX 13 semantics).")


# --- LpNormalization ----------------------------------------------------------------------------------


def _lp_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    w = float_compute(x)
    axis = _ref_axis(c.attrs["axis"], x.dim())
    norm = torch.linalg.vector_norm(w, ord=c.attrs["p"], dim=axis, keepdim=True)
    return [torch.where(norm == 0, torch.zeros_like(w), w / norm).to(x.dtype)]


register("LpNormalization", inputs=["input"], outputs=["output"],
         attrs={"axis": Attr(AttrKind.INT, -1), "p": Attr(AttrKind.INT, 2, choices=(1, 2))},
         infer=_float_same, ref=_lp_ref, doc="x / ||x||_p along `axis`; 0 where the norm is 0.")


# --- BatchNormalization -------------------------------------------------------------------------------


def _batchnorm_infer(ctx: InferCtx) -> list[TensorType]:
    dt = check_dtype(ctx, 0, ints=False)
    shape = ctx.shape(0)
    channels = None if shape is None else (shape[1] if len(shape) >= 2 else 1)
    for i, what in enumerate(("scale", "B", "input_mean", "input_var"), start=1):
        check_dtype(ctx, i, ints=False)
        _check_vector(ctx, i, channels, what)
    out = [TensorType(dt, shape)]
    if ctx.n_outputs > 1:
        if not ctx.attrs["training_mode"]:
            raise ctx.error("running_mean/running_var outputs exist only with training_mode=1")
        out += [TensorType(ctx.dtype(3), ctx.shape(3)), TensorType(ctx.dtype(4), ctx.shape(4))]
    return out


def _batchnorm_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, scale, bias, mean, var = xs[:5]
    w = float_compute(x)
    r = x.dim()
    training = bool(c.attrs["training_mode"])
    if training:
        dims = tuple(d for d in range(r) if d != 1) if r >= 2 else (0,)
        cur_mean = w.mean(dim=dims)
        cur_var = w.var(dim=dims, correction=0)
    else:
        cur_mean, cur_var = mean, var
    eps = c.attrs["epsilon"]
    y = (w - _channel_view(cur_mean, r, w.dtype)) / torch.sqrt(_channel_view(cur_var, r, w.dtype) + eps)
    y = y * _channel_view(scale, r, w.dtype) + _channel_view(bias, r, w.dtype)
    outs = [y.to(x.dtype)]
    if training and c.n_outputs > 1:
        m = c.attrs["momentum"]
        sw = float_compute(mean)
        outs.append((sw * m + cur_mean.to(sw.dtype) * (1 - m)).to(mean.dtype))
        vw = float_compute(var)
        outs.append((vw * m + cur_var.to(vw.dtype) * (1 - m)).to(var.dtype))
    return outs


register(
    "BatchNormalization", inputs=["X", "scale", "B", "input_mean", "input_var"],
    outputs=["Y", "running_mean?", "running_var?"],
    attrs={"epsilon": _EPS, "momentum": Attr(AttrKind.FLOAT, 0.9),
           "training_mode": Attr(AttrKind.INT, 0, choices=(0, 1))},
    infer=_batchnorm_infer, ref=_batchnorm_ref,
    doc="Per-channel (axis 1) normalization with given statistics, or batch statistics when training_mode=1 "
        "(then running_mean/running_var = input * momentum + batch * (1 - momentum)). ONNX 15 semantics.",
)


# --- InstanceNormalization ----------------------------------------------------------------------------


def _instancenorm_infer(ctx: InferCtx) -> list[TensorType]:
    dt = check_dtype(ctx, 0, ints=False)
    shape = ctx.shape(0)
    if shape is not None and len(shape) < 2:
        raise ctx.error(f"input must be at least 2-D (N x C x ...), got rank {len(shape)}")
    channels = None if shape is None else shape[1]
    _check_vector(ctx, 1, channels, "scale")
    _check_vector(ctx, 2, channels, "B")
    return [TensorType(dt, shape)]


def _standardize(u: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """(u - mean) / sqrt(var + eps) over `dims` (an empty `dims` normalizes each element alone)."""
    if not dims:
        return (u - u) / torch.sqrt(torch.zeros_like(u) + eps)
    mean = u.mean(dim=dims, keepdim=True)
    d = u - mean
    var = (d * d).mean(dim=dims, keepdim=True)
    return d / torch.sqrt(var + eps)


def _instancenorm_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, scale, bias = xs
    w = float_compute(x)
    r = x.dim()
    y = _standardize(w, tuple(range(2, r)), c.attrs["epsilon"])
    y = y * _channel_view(scale, r, w.dtype) + _channel_view(bias, r, w.dtype)
    return [y.to(x.dtype)]


register("InstanceNormalization", inputs=["input", "scale", "B"], outputs=["output"], attrs={"epsilon": _EPS},
         infer=_instancenorm_infer, ref=_instancenorm_ref,
         doc="Normalizes each (n, c) slice over the spatial axes, then scale[c] * y + B[c].")


# --- LayerNormalization / RMSNormalization --------------------------------------------------------------


_STASH_ATTR = Attr(AttrKind.DTYPE, DType.FLOAT32, choices=_STASH,
                   doc="precision of the statistics (stage one); ONNX passes it as a TensorProto type")


def _layernorm_infer(ctx: InferCtx) -> list[TensorType]:
    dt = check_dtype(ctx, 0, ints=False)
    shape = ctx.shape(0)
    axis = _axis(ctx)
    _check_unidirectional(ctx, 1, shape, "Scale")
    if ctx.has(2):
        _check_unidirectional(ctx, 2, shape, "B")
    stats: Shape | None = None
    if shape is not None and axis is not None:
        stats = tuple(shape[:axis]) + (1,) * (len(shape) - axis)
    stash: DType = ctx.attrs["stash_type"]
    return [TensorType(dt, shape), TensorType(stash, stats), TensorType(stash, stats)]


def _layernorm_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, scale = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    axis = _ref_axis(c.attrs["axis"], x.dim())
    dims = tuple(range(axis, x.dim()))
    u = x.to(c.attrs["stash_type"].torch)
    mean = u.mean(dim=dims, keepdim=True)
    d = u - mean
    inv_std = 1 / torch.sqrt((d * d).mean(dim=dims, keepdim=True) + c.attrs["epsilon"])
    y = (d * inv_std).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return [y.to(x.dtype), mean, inv_std]


register(
    "LayerNormalization", inputs=["X", "Scale", "B?"], outputs=["Y", "Mean?", "InvStdDev?"],
    attrs={"axis": Attr(AttrKind.INT, -1), "epsilon": _EPS, "stash_type": _STASH_ATTR},
    infer=_layernorm_infer, ref=_layernorm_ref,
    doc="Standardizes over axes [axis, rank) in `stash_type`, then Y = normalized * Scale + B (Scale and B "
        "broadcast to X). Mean and InvStdDev have X's leading dims and 1s, in `stash_type`. ONNX 17.",
)


def _rmsnorm_infer(ctx: InferCtx) -> list[TensorType]:
    check_dtype(ctx, 0, ints=False)
    _axis(ctx)
    _check_unidirectional(ctx, 1, ctx.shape(0), "scale")
    return [TensorType(check_dtype(ctx, 1, ints=False), ctx.shape(0))]


def _rmsnorm_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, scale = xs
    dims = tuple(range(_ref_axis(c.attrs["axis"], x.dim()), x.dim()))
    u = x.to(c.attrs["stash_type"].torch)
    rms = torch.sqrt((u * u).mean(dim=dims, keepdim=True) + c.attrs["epsilon"])
    return [(u / rms).to(x.dtype).to(scale.dtype) * scale]


register(
    "RMSNormalization", inputs=["X", "scale"], outputs=["Y"],
    attrs={"axis": Attr(AttrKind.INT, -1), "epsilon": _EPS, "stash_type": _STASH_ATTR},
    infer=_rmsnorm_infer, ref=_rmsnorm_ref,
    doc="X / sqrt(mean(X^2 over [axis, rank)) + epsilon) * scale; Y has scale's dtype. ONNX 23.",
)


# --- GroupNormalization -------------------------------------------------------------------------------


def _groupnorm_infer(ctx: InferCtx) -> list[TensorType]:
    dt = check_dtype(ctx, 0, ints=False)
    shape = ctx.shape(0)
    groups = ctx.attrs["num_groups"]
    if groups < 1:
        raise ctx.error(f"num_groups must be positive, got {groups}")
    if shape is not None:
        if len(shape) < 2:
            raise ctx.error(f"input must be at least 2-D (N x C x ...), got rank {len(shape)}")
        if isinstance(shape[1], int) and shape[1] % groups:
            raise ctx.error(f"{shape[1]} channels do not split into {groups} groups")
    channels = None if shape is None else shape[1]
    _check_vector(ctx, 1, channels, "scale")
    _check_vector(ctx, 2, channels, "bias")
    return [TensorType(dt, shape)]


def _groupnorm_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, scale, bias = xs
    n, ch = x.shape[0], x.shape[1]
    groups = c.attrs["num_groups"]
    if ch % groups:
        raise ValueError(f"{ch} channels do not split into {groups} groups")
    per_group = (ch // groups) * math.prod(x.shape[2:])
    u = x.to(c.attrs["stash_type"].torch).reshape(n, groups, per_group)
    y = _standardize(u, (2,), c.attrs["epsilon"]).reshape(x.shape).to(x.dtype)
    y = y * _channel_view(scale, x.dim(), x.dtype) + _channel_view(bias, x.dim(), x.dtype)
    return [y]


register(
    "GroupNormalization", inputs=["X", "scale", "bias"], outputs=["Y"],
    attrs={"num_groups": Attr(AttrKind.INT), "epsilon": _EPS, "stash_type": _STASH_ATTR},
    infer=_groupnorm_infer, ref=_groupnorm_ref,
    doc="Standardizes each group of C/num_groups channels (with the spatial axes) per instance, then "
        "scale[c] * y + bias[c] per channel. ONNX 21 semantics (per-channel scale and bias).",
)


# --- MeanVarianceNormalization ------------------------------------------------------------------------

_MVN_EPS = 1e-9


def _mvn_infer(ctx: InferCtx) -> list[TensorType]:
    check_dtype(ctx, 0, ints=False)
    rank = ctx.rank(0)
    if rank is not None:
        for a in ctx.attrs["axes"]:
            ctx.axis(a, rank)
    return [ctx.tensor(0)]


def _mvn_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    w = float_compute(x)
    dims = tuple(sorted({_ref_axis(a, x.dim()) for a in c.attrs["axes"]}))
    mean = w.mean(dim=dims, keepdim=True)
    d = w - mean
    std = torch.sqrt((d * d).mean(dim=dims, keepdim=True))
    return [(d / (std + _MVN_EPS)).to(x.dtype)]


register(
    "MeanVarianceNormalization", inputs=["X"], outputs=["Y"],
    attrs={"axes": Attr(AttrKind.INTS, (0, 2, 3))}, infer=_mvn_infer, ref=_mvn_ref,
    doc="(X - mean) / (sqrt(variance) + 1e-9) over `axes` (the ONNX function body's epsilon).",
)


# --- LRN ------------------------------------------------------------------------------------------------


def _lrn_infer(ctx: InferCtx) -> list[TensorType]:
    check_dtype(ctx, 0, ints=False)
    if ctx.attrs["size"] < 1:
        raise ctx.error(f"size must be positive, got {ctx.attrs['size']}")
    rank = ctx.rank(0)
    if rank is not None and rank < 2:
        raise ctx.error(f"input must be at least 2-D (N x C x ...), got rank {rank}")
    return [ctx.tensor(0)]


def _lrn_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    if x.numel() == 0:
        return [x.clone()]
    size, a = c.attrs["size"], c.attrs
    w = float_compute(x)
    lo = (size - 1) // 2
    hi = size - 1 - lo
    # The window sum over channels [c - lo, c + hi], along the channel axis (moved last). A sum, not a
    # convolution with ones: CUDA convolutions may round their inputs to TF32.
    moved = (w * w).movedim(1, -1)
    flat = F.pad(moved.reshape(-1, moved.shape[-1]), (lo, hi))
    sums = flat.unfold(-1, size, 1).sum(-1).reshape(moved.shape).movedim(-1, 1)
    y = w / (a["bias"] + a["alpha"] / size * sums) ** a["beta"]
    return [y.to(x.dtype)]


register(
    "LRN", inputs=["X"], outputs=["Y"],
    attrs={"size": Attr(AttrKind.INT), "alpha": Attr(AttrKind.FLOAT, 1e-4),
           "beta": Attr(AttrKind.FLOAT, 0.75), "bias": Attr(AttrKind.FLOAT, 1.0)},
    infer=_lrn_infer, ref=_lrn_ref,
    doc="x / (bias + alpha / size * sum of x^2 over a window of `size` channels) ^ beta.",
)
