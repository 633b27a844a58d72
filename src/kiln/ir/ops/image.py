"""Op table entries: image ops (Resize, GridSample, AffineGrid, RoiAlign, NonMaxSuppression, ImageDecoder).

Resize is separable: each resized axis is interpolated on its own, through an (out, in) weight matrix (linear,
cubic, antialiased) or an index map (nearest). Coordinates are computed in float64, values in float64 (cast
back to the input type; integer types round half to even and saturate).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register
from kiln.ir.ops.conv import FLOATS
from kiln.ir.ops.tensor import shape_values
from kiln.utils.errors import ExecutionError, UnsupportedError

# --- Resize -------------------------------------------------------------------------------------------

COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
               "tf_crop_and_resize")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")

_RESIZE_ATTRS = {
    "antialias": Attr(AttrKind.INT, 0, (0, 1), "widen linear/cubic filters by 1/scale when downscaling"),
    "axes": Attr(AttrKind.INTS, None, doc="axes that roi/scales/sizes refer to (default: all)"),
    "coordinate_transformation_mode": Attr(AttrKind.STRING, "half_pixel", COORD_MODES),
    "cubic_coeff_a": Attr(AttrKind.FLOAT, -0.75, doc="the cubic kernel's a"),
    "exclude_outside": Attr(AttrKind.INT, 0, (0, 1), "zero (and renormalize) taps outside the input"),
    "extrapolation_value": Attr(AttrKind.FLOAT, 0.0, doc="tf_crop_and_resize value outside the input"),
    "keep_aspect_ratio_policy": Attr(AttrKind.STRING, "stretch", ("stretch", "not_larger", "not_smaller")),
    "mode": Attr(AttrKind.STRING, "nearest", ("nearest", "linear", "cubic")),
    "nearest_mode": Attr(AttrKind.STRING, "round_prefer_floor", NEAREST_MODES,
                         "'simple' is the rounding of ONNX Resize-10/Upsample: ceil on axes scaled below 1, "
                         "floor otherwise"),
}


def _norm_axes(axes: Sequence[int] | None, rank: int, fail: Any) -> list[int]:
    if axes is None:
        return list(range(rank))
    out = [a + rank if a < 0 else a for a in axes]
    if any(not 0 <= a < rank for a in out) or len(set(out)) != len(out):
        raise fail(f"axes {list(axes)} are invalid for rank {rank}")
    return out


def _given(v: Any) -> bool:
    """An optional input counts as given unless absent or empty (ONNX models pass empty scales/roi)."""
    return v is not None and v.numel() > 0


def _resize_infer(ctx: InferCtx) -> list[TensorType]:
    dt = ctx.dtype(0)
    if ctx.attrs["mode"] != "nearest" and (dt is DType.STRING or dt is DType.BOOL):
        raise ctx.error(f"{ctx.attrs['mode']} interpolation of {dt} is not defined")
    x = ctx.shape(0)
    if x is None:
        return [TensorType(dt, None)]
    axes = _norm_axes(ctx.attrs["axes"], len(x), ctx.error)
    consts = [ctx.const(i) for i in (1, 2, 3)]
    has = [ctx.has(i) and not (c is not None and c.numel() == 0) for i, c in zip((1, 2, 3), consts)]
    _, scales_c, sizes_c = consts
    _, has_scales, has_sizes = has
    if not has_scales and not has_sizes:
        raise ctx.error("Resize needs scales or sizes")
    for c, name in ((scales_c, "scales"), (sizes_c, "sizes")):
        if c is not None and c.numel() and c.numel() != len(axes):
            raise ctx.error(f"{name} has {c.numel()} values, {len(axes)} expected (one per resized axis)")
    out = list(x)
    if has_scales and has_sizes and scales_c is not None and sizes_c is not None:
        raise ctx.error("only one of scales and sizes may be given")
    sizes = shape_values(ctx.value(3)) if has_sizes else None  # constants, or dims computed from shapes
    if sizes is not None and len(sizes) == len(axes):
        resized = _policy_sizes(ctx.attrs["keep_aspect_ratio_policy"], [x[a] for a in axes], sizes)
    elif has_scales and scales_c is not None and not has_sizes:
        resized = [_scaled_dim(x[a], float(s)) for a, s in zip(axes, scales_c.tolist())]
    else:
        resized = [None] * len(axes)
    for a, d in zip(axes, resized):
        out[a] = ctx.fresh("resized") if d is None else d
    return [TensorType(dt, tuple(out))]


def _scaled_dim(d: sym.Dim, scale: float) -> sym.Dim | None:
    if isinstance(d, int):
        return math.floor(d * scale)
    f = Fraction(scale)
    if f.denominator > 1024:
        return None
    return sym.floordiv(sym.mul(d, f.numerator), f.denominator)


def _policy_sizes(policy: str, dims: Sequence[sym.Dim], sizes: Sequence[sym.Dim]) -> list[sym.Dim | None]:
    if policy == "stretch":
        return list(sizes)
    if not all(isinstance(d, int) for d in (*dims, *sizes)):
        return [None] * len(sizes)
    scale = _policy_scale(policy, dims, sizes)  # type: ignore[arg-type]
    return [int(scale * d + 0.5) for d in dims]  # type: ignore[operator]


def _policy_scale(policy: str, dims: Sequence[int], sizes: Sequence[int]) -> float:
    ratios = [s / d for s, d in zip(sizes, dims)]
    return min(ratios) if policy == "not_larger" else max(ratios)


def _coords(ctm: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float]) -> torch.Tensor:
    """Input coordinate of every output position along one axis (float64)."""
    y = torch.arange(out_len, dtype=torch.float64)
    width = scale * in_len  # the possibly fractional output length
    if ctm == "half_pixel":
        return (y + 0.5) / scale - 0.5
    if ctm == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - out_len / width)
        return offset + (y + 0.5) / scale - 0.5
    if ctm == "pytorch_half_pixel":
        return (y + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros(out_len, dtype=torch.float64)
    if ctm == "asymmetric":
        return y / scale
    if ctm == "align_corners":
        return torch.zeros(out_len, dtype=torch.float64) if width == 1 else y * (in_len - 1) / (width - 1)
    start, end = roi  # tf_crop_and_resize
    if width == 1:
        centre = (end - start) * (in_len - 1) / 2 + start * (in_len - 1)
        return torch.full((out_len,), centre, dtype=torch.float64)
    return y * (end - start) * (in_len - 1) / (width - 1) + start * (in_len - 1)


def _nearest_index(x: torch.Tensor, mode: str, scale: float, in_len: int) -> torch.Tensor:
    lo = torch.floor(x)
    frac = x - lo
    if mode == "round_prefer_floor":
        idx = lo + (frac > 0.5)
    elif mode == "round_prefer_ceil":
        idx = lo + (frac >= 0.5)
    elif mode == "floor" or (mode == "simple" and scale >= 1):
        idx = lo
    else:  # ceil, or simple when downscaling
        idx = torch.ceil(x)
    return idx.to(torch.int64).clamp(0, in_len - 1)


def _cubic(t: torch.Tensor, a: float) -> torch.Tensor:
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _weights(x: torch.Tensor, in_len: int, scale: float, attrs: dict[str, Any]) -> torch.Tensor:
    """The (out, in) interpolation matrix of one axis for linear/cubic modes."""
    cubic = attrs["mode"] == "cubic"
    antialias = bool(attrs["antialias"])
    s = min(scale, 1.0) if antialias else 1.0
    reach = 2 if cubic else 1
    first = math.floor(-reach / s) + 1
    base = torch.ceil(x) - 1  # so that the fraction lies in (0, 1], as ONNX defines the taps
    ratio = x - base
    offs = torch.arange(first, 2 - first, dtype=torch.float64)
    dist = (offs[None, :] - ratio[:, None]) * s
    w = _cubic(dist, attrs["cubic_coeff_a"]) if cubic else (1 - dist.abs()).clamp(min=0)
    idx = base.to(torch.int64)[:, None] + offs.to(torch.int64)[None, :]
    if antialias:
        w = w / w.sum(1, keepdim=True)
    if attrs["exclude_outside"]:
        w = torch.where((idx >= 0) & (idx < in_len), w, torch.zeros_like(w))
        total = w.sum(1, keepdim=True)
        w = w / torch.where(total == 0, torch.ones_like(total), total)
    m = torch.zeros(x.shape[0], in_len, dtype=torch.float64)
    m.scatter_add_(1, idx.clamp(0, in_len - 1), w)
    return m


def _resize_axis(x: Any, axis: int, out_len: int, scale: float, roi: tuple[float, float],
                 attrs: dict[str, Any]) -> Any:
    in_len = x.shape[axis]
    ctm = attrs["coordinate_transformation_mode"]
    # The per-axis coordinates, indices and weights are small: computed on the CPU (the same numbers on
    # every device), then moved to x's device.
    coords = _coords(ctm, out_len, in_len, scale, roi)
    outside = (coords < 0) | (coords > in_len - 1) if ctm == "tf_crop_and_resize" else None
    if attrs["mode"] == "nearest":
        idx = _nearest_index(coords, attrs["nearest_mode"], scale, in_len)
        if isinstance(x, np.ndarray):
            return np.take(x, idx.numpy(), axis=axis)
        y = x.index_select(axis, idx.to(x.device))
    else:
        weights = _weights(coords, in_len, scale, attrs).to(device=x.device, dtype=x.dtype)
        y = torch.tensordot(x, weights, dims=([axis], [1])).movedim(-1, axis)
    if outside is not None and bool(outside.any()):
        shape = [1] * y.dim()
        shape[axis] = out_len
        fill = torch.tensor(attrs["extrapolation_value"]).to(y.dtype)
        y = torch.where(outside.reshape(shape).to(y.device), fill, y)
    return y


def _resize_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    roi, scales, sizes = (xs[i] if len(xs) > i and _given(xs[i]) else None for i in (1, 2, 3))
    attrs = c.attrs
    rank = x.ndim if isinstance(x, np.ndarray) else x.dim()
    fail = lambda msg: ExecutionError(f"node '{c.node.name}' (Resize): {msg}")  # noqa: E731
    axes = _norm_axes(attrs["axes"], rank, fail)
    dims = [int(x.shape[a]) for a in axes]
    if sizes is not None:
        want = [int(v) for v in sizes.tolist()]
        if attrs["keep_aspect_ratio_policy"] == "stretch":
            outs, factors = want, [o / d if d else 1.0 for o, d in zip(want, dims)]
        else:
            s = _policy_scale(attrs["keep_aspect_ratio_policy"], dims, want)
            outs, factors = [int(s * d + 0.5) for d in dims], [s] * len(dims)
    elif scales is not None:
        factors = [float(v) for v in scales.tolist()]
        outs = [math.floor(f * d) for f, d in zip(factors, dims)]
    else:
        raise fail("neither scales nor sizes is given")
    if len(outs) != len(axes):
        raise fail(f"scales/sizes have {len(outs)} values for {len(axes)} axes")
    if any(f <= 0 for f in factors):
        raise fail(f"scales must be > 0, got {factors}")
    rois = _rois(roi, len(axes), fail)
    y = _to_compute(x, attrs["mode"])
    for a, d, o, f, r in zip(axes, dims, outs, factors, rois):
        crop = attrs["coordinate_transformation_mode"] == "tf_crop_and_resize" and r != (0.0, 1.0)
        if o == d and math.isclose(f, 1.0) and not crop:
            continue
        y = _resize_axis(y, a, o, f, r, attrs)
    return [_from_compute(y, x)]


def _rois(roi: Any, n: int, fail: Any) -> list[tuple[float, float]]:
    if roi is None:
        return [(0.0, 1.0)] * n
    vals = [float(v) for v in roi.reshape(-1).tolist()]
    if len(vals) != 2 * n:
        raise fail(f"roi has {len(vals)} values, {2 * n} expected")
    return [(vals[i], vals[i + n]) for i in range(n)]


def _to_compute(x: Any, mode: str) -> Any:
    if mode == "nearest" or isinstance(x, np.ndarray):
        return x
    return x.to(torch.complex128 if x.dtype.is_complex else torch.float64)


def _from_compute(y: Any, x: Any) -> Any:
    if isinstance(x, np.ndarray) or y.dtype == x.dtype:
        return y
    if x.dtype.is_floating_point or x.dtype.is_complex:
        return y.to(x.dtype)
    info = torch.iinfo(x.dtype)
    return torch.round(y).clamp(info.min, info.max).to(x.dtype)


register(
    "Resize", inputs=["X", "roi?", "scales?", "sizes?"], outputs=["Y"], attrs=_RESIZE_ATTRS,
    infer=_resize_infer, ref=_resize_ref,
    doc="Resizes the given axes by scales (out = floor(in * scale)) or to sizes, with nearest, N-linear or "
        "N-cubic interpolation (ONNX Resize-19 semantics). Empty roi/scales/sizes count as absent.",
)


# --- GridSample ---------------------------------------------------------------------------------------


def _grid_sample_infer(ctx: InferCtx) -> list[TensorType]:
    dt, gt = ctx.dtype(0), ctx.dtype(1)
    if gt not in FLOATS:
        raise ctx.error(f"grid must be a float tensor, got {gt}")
    if dt is DType.STRING or (ctx.attrs["mode"] != "nearest" and dt not in FLOATS):
        raise UnsupportedError(f"{ctx.attrs['mode']} sampling of {dt} is not supported",
                               op=ctx.node.op, node=ctx.node.name)
    x, g = ctx.shape(0), ctx.shape(1)
    if x is not None and g is not None:
        if len(x) != len(g) or len(x) < 3:
            raise ctx.error(f"X has rank {len(x)}, grid rank {len(g)}; grid must be (N, *out, {len(x) - 2})")
        if isinstance(g[-1], int) and g[-1] != len(x) - 2:
            raise ctx.error(f"grid's last dim is {g[-1]}, {len(x) - 2} expected")
    if g is None:
        return [TensorType(dt, None if x is None else ctx.fresh_shape(len(x), "gs"))]
    n = x[0] if x is not None else g[0]
    ch = x[1] if x is not None else ctx.fresh("c")
    return [TensorType(dt, (n, ch, *g[1:-1]))]


def _reflect(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    rng = hi - lo
    if rng <= 0:
        return torch.full_like(x, lo)
    below, above = lo - x, x - hi
    dx = torch.where(x < lo, below, above)
    k = torch.floor(dx / rng)
    r = dx - k * rng
    even = torch.remainder(k, 2) == 0
    from_lo = torch.where(even, lo + r, hi - r)
    from_hi = torch.where(even, hi - r, lo + r)
    return torch.where(x < lo, from_lo, torch.where(x > hi, from_hi, x))


def _axis_taps(x: torch.Tensor, size: int, mode: str, padding: str, align: bool
               ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """(index, weight, valid) per tap along one axis, for unnormalized coordinates x."""
    lo, hi = (0.0, size - 1.0) if align else (-0.5, size - 0.5)
    if mode == "nearest":
        x = torch.round(x)  # half to even, as ONNX (and PyTorch) define it
    out_of_range = (x < lo) | (x > hi)
    # Linear and nearest pad the coordinate; cubic pads each tap instead (as PyTorch and onnxruntime do).
    if padding == "border" and mode != "cubic":
        x = torch.where(out_of_range, x.clamp(0, size - 1), x)
    elif padding == "reflection" and mode != "cubic":
        x = torch.where(out_of_range, _reflect(x, lo, hi), x)
    taps: list[tuple[torch.Tensor, torch.Tensor | None]]
    if mode == "nearest":
        taps = [(torch.trunc(x), None)]
    else:
        base = torch.floor(x)
        t = x - base
        if mode == "linear":
            taps = [(base, 1 - t), (base + 1, t)]
        else:
            taps = [(base + (i - 1), _cubic(t - (i - 1), -0.75)) for i in range(4)]
    out: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
    for idx, w in taps:
        if padding == "zeros":
            valid = (idx >= 0) & (idx < size)
        else:
            valid = torch.ones_like(idx, dtype=torch.bool)
            idx = idx.clamp(0, size - 1) if padding == "border" else torch.trunc(_reflect(idx, lo, hi))
        out.append((idx.to(torch.int64).clamp(0, size - 1), w, valid))
    return out


def grid_sample(x: torch.Tensor, grid: torch.Tensor, mode: str, padding: str, align: bool) -> torch.Tensor:
    """ONNX GridSample on (N, C, *S) with a grid (N, *O, r) of normalized (x, y, ...) coordinates."""
    bsz, ch = x.shape[:2]
    size = list(x.shape[2:])
    n = len(size)
    out_shape = list(grid.shape[1:-1])
    coords = grid.to(torch.float64).reshape(bsz, -1, n).flip(-1)  # axis order of S
    per_axis = []
    for d in range(n):
        g = coords[..., d]
        u = (g + 1) / 2 * (size[d] - 1) if align else ((g + 1) * size[d] - 1) / 2
        per_axis.append(_axis_taps(u, size[d], mode, padding, align))
    flat = x.reshape(bsz, ch, -1)
    exact = mode == "nearest"
    acc = torch.zeros(bsz, ch, coords.shape[1], dtype=x.dtype if exact else torch.float64, device=x.device)
    src = flat if exact else flat.to(torch.float64)
    for combo in _product(per_axis):
        idx = torch.zeros_like(combo[0][0])
        weight: torch.Tensor | None = None
        valid = torch.ones_like(combo[0][2])
        for d, (i, w, v) in enumerate(combo):
            idx = idx * size[d] + i
            valid = valid & v
            if w is not None:
                weight = w if weight is None else weight * w
        vals = torch.gather(src, 2, idx[:, None, :].expand(bsz, ch, -1))
        if exact:
            acc = torch.where(valid[:, None, :], vals, acc)
        else:
            assert weight is not None
            acc = acc + vals * (weight * valid)[:, None, :]
    return acc.reshape(bsz, ch, *out_shape)


def _product(lists: list[list[Any]]) -> list[list[Any]]:
    out: list[list[Any]] = [[]]
    for items in lists:
        out = [[*prefix, it] for prefix in out for it in items]
    return out


def _grid_sample_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, grid = xs
    a = c.attrs
    y = grid_sample(x, grid, a["mode"], a["padding_mode"], bool(a["align_corners"]))
    return [y.to(x.dtype)]


register(
    "GridSample", inputs=["X", "grid"], outputs=["Y"],
    attrs={"align_corners": Attr(AttrKind.INT, 0, (0, 1), "-1/1 are corner pixel centers (1) or edges (0)"),
           "mode": Attr(AttrKind.STRING, "linear", ("linear", "nearest", "cubic")),
           "padding_mode": Attr(AttrKind.STRING, "zeros", ("zeros", "border", "reflection"))},
    infer=_grid_sample_infer, ref=_grid_sample_ref,
    doc="Samples X (N, C, *S) at the normalized positions of grid (N, *O, r): N-linear, nearest or N-cubic "
        "(a = -0.75), any number of spatial axes.",
)


# --- AffineGrid ---------------------------------------------------------------------------------------


def _affine_grid_infer(ctx: InferCtx) -> list[TensorType]:
    dt = ctx.dtype(0)
    if dt not in FLOATS:
        raise ctx.error(f"theta must be a float tensor, got {dt}")
    if ctx.dtype(1) != DType.INT64:
        raise ctx.error(f"size must be int64, got {ctx.dtype(1)}")
    size = shape_values(ctx.value(1))
    theta = ctx.shape(0)
    if size is not None:
        if len(size) not in (4, 5):
            raise ctx.error(f"size must have 4 (2-D) or 5 (3-D) values, got {size}")
        return [TensorType(dt, (size[0], *size[2:], len(size) - 2))]
    s = ctx.shape(1)
    if s is None or not isinstance(s[0], int):
        return [TensorType(dt, None)]
    n = theta[0] if theta is not None else ctx.fresh("n")
    return [TensorType(dt, (n, *[ctx.fresh("grid") for _ in range(s[0] - 2)], s[0] - 2))]


def _base_coords(size: int, align: bool) -> torch.Tensor:
    """The normalized positions along one axis (float64, on the CPU: the same numbers on every device)."""
    if align:
        return torch.linspace(-1, 1, size, dtype=torch.float64) if size > 1 else torch.full((size,), -1.0,
                                                                                         dtype=torch.float64)
    return (torch.arange(size, dtype=torch.float64) * 2 + 1) / size - 1


def _affine_grid_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    theta, size = xs[0], [int(v) for v in xs[1].tolist()]
    spatial = size[2:]
    n = len(spatial)
    axes = [_base_coords(s, bool(c.attrs["align_corners"])) for s in spatial]
    mesh = torch.meshgrid(*axes, indexing="ij")
    # Homogeneous positions ordered (x, y[, z], 1): the last spatial axis first.
    homog = torch.stack([*reversed(mesh), torch.ones(spatial, dtype=torch.float64)], -1).reshape(-1, n + 1)
    grid = torch.einsum("bij,pj->bpi", theta.to(torch.float64), homog.to(theta.device))
    return [grid.reshape(size[0], *spatial, n).to(theta.dtype)]


register(
    "AffineGrid", inputs=["theta", "size"], outputs=["grid"],
    attrs={"align_corners": Attr(AttrKind.INT, 0, (0, 1), "-1/1 are corner pixel centers (1) or edges (0)")},
    infer=_affine_grid_infer, ref=_affine_grid_ref,
    doc="Sampling grid (N, *S, r) of theta (N, r, r+1) applied to evenly spaced normalized positions.",
)


# --- RoiAlign -----------------------------------------------------------------------------------------


def _roi_align_infer(ctx: InferCtx) -> list[TensorType]:
    dt = ctx.dtype(0)
    if dt not in FLOATS or ctx.dtype(1) != dt:
        raise ctx.error(f"X and rois must be the same float type, got {dt} and {ctx.dtype(1)}")
    if ctx.dtype(2) != DType.INT64:
        raise ctx.error(f"batch_indices must be int64, got {ctx.dtype(2)}")
    x, rois, bi = ctx.shape(0), ctx.shape(1), ctx.shape(2)
    if x is not None and len(x) != 4:
        raise ctx.error(f"X must be 4-D (N, C, H, W), got rank {len(x)}")
    if rois is not None and (len(rois) != 2 or (isinstance(rois[1], int) and rois[1] != 4)):
        raise ctx.error(f"rois must be (num_rois, 4), got {list(rois)}")
    r = rois[0] if rois is not None else bi[0] if bi is not None else ctx.fresh("rois")
    ch = x[1] if x is not None else ctx.fresh("c")
    oh, ow = ctx.attrs["output_height"], ctx.attrs["output_width"]
    if oh < 1 or ow < 1 or ctx.attrs["sampling_ratio"] < 0:
        raise ctx.error("output_height/output_width must be >= 1 and sampling_ratio >= 0")
    return [TensorType(dt, (r, ch, oh, ow))]


def _roi_samples(start: float, length: float, pooled: int, grid: int, size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample positions along one axis -> (low index, high index, low weight, high weight), each of shape
    (pooled, grid). Samples beyond [-1, size] get zero weights."""
    bin_len = length / pooled
    p = torch.arange(pooled, dtype=torch.float64)[:, None]
    i = torch.arange(grid, dtype=torch.float64)[None, :]
    pos = start + p * bin_len + (i + 0.5) * bin_len / grid
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = torch.floor(pos)
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    pos = torch.where(edge, low, pos)
    frac = pos - low
    zero = torch.zeros_like(frac)
    return (low.to(torch.int64), high.to(torch.int64), torch.where(valid, 1 - frac, zero),
            torch.where(valid, frac, zero))


def _roi_align_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, rois, batch = xs
    a = c.attrs
    oh, ow, ratio, scale = a["output_height"], a["output_width"], a["sampling_ratio"], a["spatial_scale"]
    half = a["coordinate_transformation_mode"] == "half_pixel"
    height, width = x.shape[2:]
    out = torch.zeros(rois.shape[0], x.shape[1], oh, ow, dtype=torch.float64, device=x.device)
    xd = x.to(torch.float64)
    for r, (roi, b) in enumerate(zip(rois.to(torch.float64).tolist(), batch.tolist())):
        shift = 0.5 if half else 0.0
        x1, y1, x2, y2 = (v * scale - shift for v in roi)
        rw, rh = x2 - x1, y2 - y1
        if not half:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = ratio if ratio > 0 else math.ceil(rh / oh)
        gw = ratio if ratio > 0 else math.ceil(rw / ow)
        if gh <= 0 or gw <= 0:  # an inverted RoI has no samples: its bins are 0
            continue
        # The sample positions and weights are small: computed on the CPU, then moved to x's device.
        ys = tuple(t.to(x.device) for t in _roi_samples(y1, rh, oh, gh, height))
        xs_ = tuple(t.to(x.device) for t in _roi_samples(x1, rw, ow, gw, width))
        img = xd[int(b)]
        if a["mode"] == "avg":
            out[r] = _roi_avg(img, ys, xs_, oh, ow, max(gh * gw, 1))
        else:
            out[r] = _roi_max(img, ys, xs_, oh, gh, ow, gw)
    return [out.to(x.dtype)]


def _axis_matrix(samples: tuple[torch.Tensor, ...], pooled: int, size: int) -> torch.Tensor:
    low, high, wl, wh = samples
    m = torch.zeros(pooled, size, dtype=torch.float64, device=low.device)
    m.scatter_add_(1, low, wl)
    m.scatter_add_(1, high, wh)
    return m


def _roi_avg(img: torch.Tensor, ys: tuple[torch.Tensor, ...], xs: tuple[torch.Tensor, ...], oh: int, ow: int,
             count: int) -> torch.Tensor:
    my, mx = _axis_matrix(ys, oh, img.shape[1]), _axis_matrix(xs, ow, img.shape[2])
    return torch.einsum("ph,chw,qw->cpq", my, img, mx) / count


def _roi_max(img: torch.Tensor, ys: tuple[torch.Tensor, ...], xs: tuple[torch.Tensor, ...], oh: int, gh: int,
             ow: int, gw: int) -> torch.Tensor:
    # ONNX's max mode takes the max of the four weighted corners of each sample, then over samples.
    best: torch.Tensor | None = None
    for yi, yw in ((ys[0], ys[2]), (ys[1], ys[3])):
        rows = img[:, yi.reshape(-1)]  # (C, oh*gh, W)
        for xi, xw in ((xs[0], xs[2]), (xs[1], xs[3])):
            v = rows[:, :, xi.reshape(-1)] * (yw.reshape(-1, 1) * xw.reshape(1, -1))
            best = v if best is None else torch.maximum(best, v)
    assert best is not None
    return best.reshape(img.shape[0], oh, gh, ow, gw).amax((2, 4))


register(
    "RoiAlign", inputs=["X", "rois", "batch_indices"], outputs=["Y"],
    attrs={"coordinate_transformation_mode": Attr(AttrKind.STRING, "half_pixel",
                                                  ("half_pixel", "output_half_pixel"),
                                                  "half_pixel shifts RoI coordinates by -0.5"),
           "mode": Attr(AttrKind.STRING, "avg", ("avg", "max")),
           "output_height": Attr(AttrKind.INT, 1), "output_width": Attr(AttrKind.INT, 1),
           "sampling_ratio": Attr(AttrKind.INT, 0, doc="samples per bin and axis; 0 = ceil(roi size / bins)"),
           "spatial_scale": Attr(AttrKind.FLOAT, 1.0, doc="scales RoI coordinates to X's grid")},
    infer=_roi_align_infer, ref=_roi_align_ref,
    doc="RoI Align: bilinear samples averaged (or maxed) per output bin; rois rows are [x1, y1, x2, y2].",
)


# --- NonMaxSuppression --------------------------------------------------------------------------------


def _nms_infer(ctx: InferCtx) -> list[TensorType]:
    if ctx.dtype(0) not in FLOATS or ctx.dtype(1) != ctx.dtype(0):
        raise ctx.error(f"boxes and scores must be the same float type, got {ctx.dtype(0)}, {ctx.dtype(1)}")
    if ctx.has(2) and ctx.dtype(2) != DType.INT64:
        raise ctx.error(f"max_output_boxes_per_class must be int64, got {ctx.dtype(2)}")
    b, s = ctx.shape(0), ctx.shape(1)
    if b is not None and (len(b) != 3 or (isinstance(b[2], int) and b[2] != 4)):
        raise ctx.error(f"boxes must be (batches, boxes, 4), got {list(b)}")
    if s is not None and len(s) != 3:
        raise ctx.error(f"scores must be (batches, classes, boxes), got {list(s)}")
    return [TensorType(DType.INT64, (ctx.fresh("selected"), 3))]


def _scalar(v: Any, default: Any) -> Any:
    return v.reshape(-1)[0].item() if v is not None and v.numel() else default


def _corners(boxes: torch.Tensor, center: bool) -> torch.Tensor:
    """(…, 4) boxes -> (x_min, y_min, x_max, y_max), in the input precision."""
    if center:
        hw, hh = boxes[..., 2] / 2, boxes[..., 3] / 2
        xc, yc = boxes[..., 0], boxes[..., 1]
        return torch.stack([xc - hw, yc - hh, xc + hw, yc + hh], -1)
    xs, ys = boxes[..., [1, 3]], boxes[..., [0, 2]]
    return torch.stack([xs.amin(-1), ys.amin(-1), xs.amax(-1), ys.amax(-1)], -1)


def _suppressed(box: torch.Tensor, others: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    ix0, iy0 = torch.maximum(box[0], others[:, 0]), torch.maximum(box[1], others[:, 1])
    ix1, iy1 = torch.minimum(box[2], others[:, 2]), torch.minimum(box[3], others[:, 3])
    overlap = (ix1 > ix0) & (iy1 > iy0)
    inter = (ix1 - ix0) * (iy1 - iy0)
    area0 = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area0 + areas - inter
    ok = overlap & (inter > 0) & (area0 > 0) & (areas > 0) & (union > 0)
    return ok & (inter / union > threshold)


def _nms_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    device = xs[0].device
    boxes, scores = xs[0].cpu(), xs[1].cpu()  # greedy, box by box: on the host, whatever the device
    opt = [xs[i] if len(xs) > i else None for i in (2, 3, 4)]
    max_out = int(_scalar(opt[0], 0))
    thr = torch.tensor(_scalar(opt[1], 0.0), dtype=boxes.dtype)
    score_thr = _scalar(opt[2], None)
    corners = _corners(boxes, bool(c.attrs["center_point_box"]))
    found: list[tuple[int, int, int]] = []
    for b in range(scores.shape[0] if max_out > 0 else 0):
        for k in range(scores.shape[1]):
            s = scores[b, k]
            cand = torch.arange(s.shape[0]) if score_thr is None else torch.nonzero(s > score_thr).reshape(-1)
            order = cand[torch.sort(s[cand], descending=True, stable=True).indices]
            alive = torch.ones(order.shape[0], dtype=torch.bool)
            kept = 0
            for i in range(order.shape[0]):
                if kept >= max_out:
                    break
                if not alive[i]:
                    continue
                found.append((b, k, int(order[i])))
                kept += 1
                rest = order[i + 1:]
                alive[i + 1:] &= ~_suppressed(corners[b, order[i]], corners[b, rest], thr)
    return [torch.tensor(found, dtype=torch.int64, device=device).reshape(-1, 3)]


register(
    "NonMaxSuppression",
    inputs=["boxes", "scores", "max_output_boxes_per_class?", "iou_threshold?", "score_threshold?"],
    outputs=["selected_indices"],
    attrs={"center_point_box": Attr(AttrKind.INT, 0, (0, 1), "0: [y1, x1, y2, x2]; 1: [x_c, y_c, w, h]")},
    infer=_nms_infer, ref=_nms_ref,
    doc="Greedy per-class NMS: boxes by descending score (ties: lower index first), dropping those whose IoU "
        "with a kept box is > iou_threshold; output rows [batch, class, box].",
)


# --- ImageDecoder -------------------------------------------------------------------------------------


def _image_decoder_infer(ctx: InferCtx) -> list[TensorType]:
    if ctx.dtype(0) != DType.UINT8:
        raise ctx.error(f"encoded_stream must be uint8, got {ctx.dtype(0)}")
    s = ctx.shape(0)
    if s is not None and len(s) != 1:
        raise ctx.error(f"encoded_stream must be 1-D, got rank {len(s)}")
    ch = 1 if ctx.attrs["pixel_format"] == "Grayscale" else 3
    return [TensorType(DType.UINT8, (ctx.fresh("height"), ctx.fresh("width"), ch))]


def _image_decoder_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    try:
        from PIL import Image
    except ImportError:
        raise UnsupportedError("decoding images needs Pillow", op="ImageDecoder", node=c.node.name,
                               hint="pip install pillow") from None
    fmt = c.attrs["pixel_format"]
    device = xs[0].device
    try:
        img = Image.open(io.BytesIO(xs[0].cpu().numpy().tobytes()))
        img.load()
    except Exception:  # undecodable input gives an empty image, as ONNX specifies
        return [torch.zeros(0, 0, 1 if fmt == "Grayscale" else 3, dtype=torch.uint8, device=device)]
    arr = np.asarray(img.convert("L" if fmt == "Grayscale" else "RGB"))
    if fmt == "Grayscale":
        arr = arr[:, :, None]
    elif fmt == "BGR":
        arr = arr[:, :, ::-1]
    return [torch.from_numpy(np.array(arr)).to(device)]  # a writable copy


register(
    "ImageDecoder", inputs=["encoded_stream"], outputs=["image"],
    attrs={"pixel_format": Attr(AttrKind.STRING, "RGB", ("RGB", "BGR", "Grayscale"))},
    infer=_image_decoder_infer, ref=_image_decoder_ref,
    doc="Decodes an encoded image (BMP, JPEG, JPEG 2000, TIFF, PNG, WebP, PNM) to (H, W, C) uint8 (Pillow).",
)
