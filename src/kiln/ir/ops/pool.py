"""Op table entries: pooling (MaxPool, AveragePool, LpPool, their Global forms, MaxUnpool, MaxRoiPool).

Windowed pools share the convolution window geometry (`conv.Window`). A ceil_mode window that would start in
the end padding is dropped (ONNX opset 22 made this explicit; kiln applies it to every version, as PyTorch and
onnxruntime do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register
from kiln.ir.ops.conv import FLOATS, Window, compute_dtype, pad_nd, spatial_out, window_attrs
from kiln.ir.ops.tensor import shape_values
from kiln.utils.errors import ExecutionError

_MAX_TYPES = (*FLOATS, DType.INT8, DType.UINT8)


# --- inference ----------------------------------------------------------------------------------------


def _pool_infer(types: Sequence[DType], n_out: int = 1) -> Any:
    def infer(ctx: InferCtx) -> list[TensorType]:
        dt = ctx.dtype(0)
        if dt not in types:
            raise ctx.error(f"element type {dt} is not supported (allowed: {', '.join(map(str, types))})")
        shape = _pool_shape(ctx)
        out = [TensorType(dt, shape)]
        if n_out == 2:
            out.append(TensorType(DType.INT64, shape))
        return out

    return infer


def _pool_shape(ctx: InferCtx) -> tuple[sym.Dim, ...] | None:
    x = ctx.shape(0)
    if x is None:
        return None
    n = len(x) - 2
    kernel = ctx.attrs["kernel_shape"]
    if n < 1:
        raise ctx.error(f"input must have rank >= 3 (N, C, spatial...), got rank {len(x)}")
    if len(kernel) != n:
        raise ctx.error(f"kernel_shape has {len(kernel)} values, the input has {n} spatial axes")
    if any(k < 1 for k in kernel):
        raise ctx.error(f"kernel_shape must be >= 1, got {list(kernel)}")
    win = Window(ctx.attrs, n, kernel, ctx.error)
    return (x[0], x[1], *spatial_out(ctx, win, list(x[2:])))


def _global_infer(types: Sequence[DType]) -> Any:
    def infer(ctx: InferCtx) -> list[TensorType]:
        dt = ctx.dtype(0)
        if dt not in types:
            raise ctx.error(f"element type {dt} is not supported (allowed: {', '.join(map(str, types))})")
        x = ctx.shape(0)
        if x is not None and len(x) < 3:
            raise ctx.error(f"input must have rank >= 3 (N, C, spatial...), got rank {len(x)}")
        return [TensorType(dt, None if x is None else (x[0], x[1], *([1] * (len(x) - 2))))]

    return infer


# --- windows ------------------------------------------------------------------------------------------


def _ref_window(c: RefCtx, x: torch.Tensor) -> tuple[Window, list[tuple[int, int]], list[int]]:
    n = x.dim() - 2
    fail = lambda msg: ExecutionError(f"node '{c.node.name}' ({c.node.op}): {msg}")  # noqa: E731
    win = Window(c.attrs, n, list(c.attrs["kernel_shape"]), fail)
    sizes = list(x.shape[2:])
    return win, win.runtime_pads(sizes), win.out_sizes(sizes)


def _windows(x: torch.Tensor, win: Window, pads: Sequence[tuple[int, int]], outs: Sequence[int],
             fill: float) -> torch.Tensor:
    """Every pooling window of x as a view of shape (N, C, *outs, prod(kernel)), padding read as `fill`."""
    n = len(outs)
    ext = []
    for i in range(n):
        need = (outs[i] - 1) * win.strides[i] + int(win.span(i))  # ceil_mode may need more than the pads
        ext.append((pads[i][0], max(pads[i][1], need - x.shape[i + 2] - pads[i][0])))
    xp = pad_nd(x, ext, fill)
    for i in range(n):
        xp = xp.unfold(2 + i, int(win.span(i)), win.strides[i])[..., :: win.dilations[i]]
        xp = xp.narrow(2 + i, 0, outs[i])
    return xp.reshape(*xp.shape[: 2 + n], -1)


def _counts(x: torch.Tensor, win: Window, pads: Sequence[tuple[int, int]], outs: Sequence[int],
            include_pad: bool) -> torch.Tensor:
    """How many elements each window averages over: real elements, or also the explicit padding."""
    total: torch.Tensor | None = None
    n = len(outs)
    for i in range(n):
        size, (pb, pe) = x.shape[i + 2], pads[i]
        span, s, d = int(win.span(i)), win.strides[i], win.dilations[i]
        start = torch.arange(outs[i], device=x.device) * s - pb
        taps = start[:, None] + torch.arange(0, span, d, device=x.device)[None, :]
        lo, hi = (-pb, size + pe) if include_pad else (0, size)
        cnt = ((taps >= lo) & (taps < hi)).sum(1).to(torch.float64)
        shape = [1] * n
        shape[i] = outs[i]
        cnt = cnt.reshape(shape)
        total = cnt if total is None else total * cnt
    assert total is not None
    return total


def _lowest(dt: torch.dtype) -> float:
    return -math.inf if dt.is_floating_point else torch.iinfo(dt).min


# --- MaxPool ------------------------------------------------------------------------------------------


def _max_pool_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    win, pads, outs = _ref_window(c, x)
    w = _windows(x, win, pads, outs, _lowest(x.dtype))
    if c.n_outputs < 2:
        return [w.amax(-1) if w.shape[-1] else x.new_full(w.shape[:-1], _lowest(x.dtype))]
    y, k = w.max(-1)
    return [y, _flat_indices(x, win, pads, outs, k, c.attrs["storage_order"])]


def _flat_indices(x: torch.Tensor, win: Window, pads: Sequence[tuple[int, int]], outs: Sequence[int],
                  k: torch.Tensor, storage_order: int) -> torch.Tensor:
    """Window-local argmax -> index into the flattened input (row- or column-major spatial order)."""
    n = len(outs)
    sizes = list(x.shape[2:])
    coords = []
    rem = k
    kernel = [int(k) for k in win.kernel]
    for i in reversed(range(n)):
        ki = rem % kernel[i]
        rem = rem // kernel[i]
        shape = [1] * n
        shape[i] = outs[i]
        start = (torch.arange(outs[i], device=k.device) * win.strides[i] - pads[i][0]).reshape(shape)
        coords.append(start + ki * win.dilations[i])
    coords.reverse()
    order = range(n) if storage_order == 0 else reversed(range(n))
    flat = torch.zeros_like(k)
    for i in order:
        flat = flat * sizes[i] + coords[i]
    plane = math.prod(sizes)
    nc = torch.arange(x.shape[0] * x.shape[1], device=k.device).reshape(x.shape[0], x.shape[1], *([1] * n))
    return flat + nc * plane


register(
    "MaxPool", inputs=["X"], outputs=["Y", "Indices?"],
    attrs={**window_attrs(kernel_required=True, ceil_mode=True),
           "storage_order": Attr(AttrKind.INT, 0, (0, 1), "Indices layout: 0 row-major, 1 column-major")},
    infer=_pool_infer(_MAX_TYPES, 2), ref=_max_pool_ref,
    doc="Max over sliding windows; Indices (optional) index the flattened input, N and C included.",
)


# --- AveragePool / LpPool -----------------------------------------------------------------------------


def _avg_pool_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    win, pads, outs = _ref_window(c, x)
    cd = compute_dtype(x)
    total = _windows(x.to(cd), win, pads, outs, 0.0).sum(-1)
    counts = _counts(x, win, pads, outs, bool(c.attrs["count_include_pad"])).to(cd)
    return [(total / counts).to(x.dtype)]


register(
    "AveragePool", inputs=["X"], outputs=["Y"],
    attrs={**window_attrs(kernel_required=True, ceil_mode=True),
           "count_include_pad": Attr(AttrKind.INT, 0, (0, 1), "count explicit padding in the divisor")},
    infer=_pool_infer(FLOATS), ref=_avg_pool_ref,
    doc="Average over sliding windows; the divisor counts real elements (and the explicit padding with "
        "count_include_pad=1), never the extra ceil_mode padding.",
)


def _lp(values: torch.Tensor, p: int, dim: Any) -> torch.Tensor:
    return values.abs().pow(p).sum(dim).pow(1.0 / p)


def _lp_pool_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    win, pads, outs = _ref_window(c, x)
    cd = compute_dtype(x)
    return [_lp(_windows(x.to(cd), win, pads, outs, 0.0), c.attrs["p"], -1).to(x.dtype)]


register(
    "LpPool", inputs=["X"], outputs=["Y"],
    attrs={**window_attrs(kernel_required=True, ceil_mode=True), "p": Attr(AttrKind.INT, 2, doc="norm order")
           },
    infer=_pool_infer(FLOATS), ref=_lp_pool_ref, doc="Lp norm over sliding windows (padding counts as 0).",
)


# --- global pools -------------------------------------------------------------------------------------


def _spatial(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.dim()))


def _global_avg_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    return [x.to(compute_dtype(x)).mean(_spatial(x), keepdim=True).to(x.dtype)]


def _global_max_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    return [x.amax(_spatial(x), keepdim=True)]


def _global_lp_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x = xs[0]
    y = _lp(x.to(compute_dtype(x)), c.attrs["p"], _spatial(x))
    return [y.reshape(*x.shape[:2], *([1] * (x.dim() - 2))).to(x.dtype)]


register("GlobalAveragePool", inputs=["X"], outputs=["Y"], infer=_global_infer(FLOATS), ref=_global_avg_ref,
         doc="Mean over all spatial axes (kept as size 1).")
register("GlobalMaxPool", inputs=["X"], outputs=["Y"], infer=_global_infer(FLOATS), ref=_global_max_ref,
         doc="Max over all spatial axes (kept as size 1).")
register("GlobalLpPool", inputs=["X"], outputs=["Y"], attrs={"p": Attr(AttrKind.INT, 2, doc="norm order")},
         infer=_global_infer(FLOATS), ref=_global_lp_ref, doc="Lp norm over all spatial axes (kept, size 1).")


# --- MaxUnpool ----------------------------------------------------------------------------------------


def _unpool_sizes(attrs: dict[str, Any], sizes: Sequence[sym.Dim], fail: Any) -> list[sym.Dim]:
    n = len(sizes)
    win = Window(attrs, n, list(attrs["kernel_shape"]), fail)
    if len(win.kernel) != n:
        raise fail(f"kernel_shape has {len(win.kernel)} values, the input has {n} spatial axes")
    return [sym.sub(sym.add(sym.mul(sym.sub(d, 1), win.strides[i]), win.kernel[i]),
                    win.pads[i] + win.pads[i + n]) for i, d in enumerate(sizes)]


def _unpool_infer(ctx: InferCtx) -> list[TensorType]:
    dt = ctx.dtype(0)
    if dt not in FLOATS:
        raise ctx.error(f"element type {dt} is not supported")
    if ctx.dtype(1) != DType.INT64:
        raise ctx.error(f"I must be int64, got {ctx.dtype(1)}")
    x = ctx.shape(0)
    if ctx.has(2):
        fixed = shape_values(ctx.value(2))
        if fixed is not None:
            return [TensorType(dt, tuple(fixed))]
        rank = None if x is None else len(x)
        return [TensorType(dt, ctx.fresh_shape(rank, "unpool"))]
    if x is None:
        return [TensorType(dt, None)]
    return [TensorType(dt, (x[0], x[1], *_unpool_sizes(ctx.attrs, list(x[2:]), ctx.error)))]


def _unpool_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, idx = xs[0], xs[1]
    fail = lambda msg: ExecutionError(f"node '{c.node.name}' (MaxUnpool): {msg}")  # noqa: E731
    if len(xs) > 2 and xs[2] is not None:
        full = [int(v) for v in xs[2].tolist()]
    else:
        full = [x.shape[0], x.shape[1], *[int(d) for d in _unpool_sizes(c.attrs, list(x.shape[2:]), fail)]]
    if idx.shape != x.shape:
        raise fail(f"I has shape {list(idx.shape)}, X {list(x.shape)}; they must match")
    numel = math.prod(full)
    flat_idx = idx.reshape(-1)
    if flat_idx.numel() and (int(flat_idx.min()) < 0 or int(flat_idx.max()) >= numel):
        raise fail(f"an index is outside the output shape {full}")
    y = x.new_zeros(numel)
    y[flat_idx] = x.reshape(-1)
    return [y.reshape(full)]


register(
    "MaxUnpool", inputs=["X", "I", "output_shape?"], outputs=["output"],
    attrs={k: v for k, v in window_attrs(kernel_required=True).items()
           if k in ("kernel_shape", "pads", "strides")},
    infer=_unpool_infer, ref=_unpool_ref,
    doc="Scatters X to the flat positions I (MaxPool's Indices: positions in the pooled input, N and C "
        "included) of a zero tensor of shape output_shape, or else (in-1)*stride + kernel - pads.",
)


# --- MaxRoiPool ---------------------------------------------------------------------------------------


def _roi_pool_infer(ctx: InferCtx) -> list[TensorType]:
    dt = ctx.dtype(0)
    if dt not in FLOATS or ctx.dtype(1) != dt:
        raise ctx.error(f"X and rois must be the same float type, got {dt} and {ctx.dtype(1)}")
    x, rois = ctx.shape(0), ctx.shape(1)
    if x is not None and len(x) != 4:
        raise ctx.error(f"X must be 4-D (N, C, H, W), got rank {len(x)}")
    if rois is not None and (len(rois) != 2 or (isinstance(rois[1], int) and rois[1] != 5)):
        raise ctx.error(f"rois must be (num_rois, 5), got {list(rois)}")
    pooled = ctx.attrs["pooled_shape"]
    if len(pooled) != 2 or min(pooled) < 1:
        raise ctx.error(f"pooled_shape must be two positive values, got {list(pooled)}")
    r = rois[0] if rois is not None else ctx.fresh("rois")
    ch = x[1] if x is not None else ctx.fresh("c")
    return [TensorType(dt, (r, ch, *pooled))]


def _bin_masks(start: float, length: int, pooled: int, size: int, device: torch.device) -> torch.Tensor:
    """(pooled, size) masks of the input rows (or columns) each output bin covers."""
    bin_len = max(length, 1) / pooled
    p = torch.arange(pooled, dtype=torch.float64, device=device)
    lo = (torch.floor(p * bin_len) + start).clamp(0, size)
    hi = (torch.ceil((p + 1) * bin_len) + start).clamp(0, size)
    pos = torch.arange(size, dtype=torch.float64, device=device)
    return (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])


def _round_half_away(v: float) -> int:
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def _roi_pool_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, rois = xs[0], xs[1]
    ph, pw = c.attrs["pooled_shape"]
    scale = c.attrs["spatial_scale"]
    height, width = x.shape[2:]
    out = x.new_zeros(rois.shape[0], x.shape[1], ph, pw)
    low = _lowest(x.dtype)
    for r, roi in enumerate(rois.to(torch.float64).tolist()):
        b = int(roi[0])
        x1, y1, x2, y2 = (_round_half_away(v * scale) for v in roi[1:5])
        rows = _bin_masks(y1, y2 - y1 + 1, ph, height, x.device)  # (ph, H)
        cols = _bin_masks(x1, x2 - x1 + 1, pw, width, x.device)  # (pw, W)
        img = x[b]  # (C, H, W)
        by_col = torch.where(cols[None, None], img[:, :, None, :], low).amax(-1)  # (C, H, pw)
        pooled = torch.where(rows[None, :, :, None], by_col[:, None], low).amax(2)  # (C, ph, pw)
        empty = ~(rows.any(1)[:, None] & cols.any(1)[None, :])
        out[r] = torch.where(empty[None], 0, pooled)
    return [out]


register(
    "MaxRoiPool", inputs=["X", "rois"], outputs=["Y"],
    attrs={"pooled_shape": Attr(AttrKind.INTS, doc="(height, width) of each pooled RoI"),
           "spatial_scale": Attr(AttrKind.FLOAT, 1.0, doc="scales RoI coordinates to X's grid")},
    infer=_roi_pool_infer, ref=_roi_pool_ref,
    doc="Caffe-style RoI max pooling; rois rows are [batch_index, x1, y1, x2, y2]; empty bins give 0.",
)
