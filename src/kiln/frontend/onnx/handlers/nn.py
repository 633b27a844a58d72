"""ONNX handlers: convolution, pooling, resize and image ops.

Ops whose every ONNX version maps onto kiln's op as is go through the default handler: Conv, ConvTranspose,
MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, MaxUnpool, MaxRoiPool, ConvInteger, QLinearConv,
DeformConv, CausalConvWithState, Col2Im, AffineGrid, NonMaxSuppression, ImageDecoder, GridSample >= 20,
RoiAlign >= 16, LpPool/GlobalLpPool >= 2. Their older versions only lack attributes (defaults match) or
differ in documentation only, where kiln follows the newest text, as ONNX's reference and onnxruntime do:
ConvTranspose-1 describes the split of a derived padding the other way round from ConvTranspose-11;
AveragePool-10..18 give VALID/SAME output-size formulas that miscount windows (fixed in AveragePool-19);
pools before opset 22 do not say that a ceil_mode window starting in the end padding is dropped.
The handlers here convert the versions that do differ.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import onnx_op
from kiln.ir.dtype import DType
from kiln.ir.graph import Value
from kiln.ir.ops.base import const_value


def _only(n: NodeCtx, allowed: Iterable[str]) -> dict[str, Any]:
    """The node's attributes, failing on any this op version does not define."""
    allowed = set(allowed)
    for k in n.attrs:
        if k not in allowed:
            raise n.fail(f"attribute '{k}' is not defined for {n.op_type}-{n.since}")
    return dict(n.attrs)


def _int_p(n: NodeCtx, attrs: dict[str, Any]) -> dict[str, Any]:
    """Version 1 of LpPool/GlobalLpPool takes p as a float; kiln's p is an integer."""
    p = attrs.get("p", 2.0)
    if float(p) != int(p):
        raise n.fail(f"p={p} is not an integer (kiln supports integer p)")
    attrs["p"] = int(p)
    return attrs


_POOL_V1 = ("auto_pad", "kernel_shape", "pads", "strides")


@onnx_op("LpPool", since=1)
def lp_pool_1(n: NodeCtx) -> list[Value]:
    return n.emit("LpPool", n.inputs, _int_p(n, _only(n, (*_POOL_V1, "p"))))


@onnx_op("LpPool", since=2)
def lp_pool_2(n: NodeCtx) -> list[Value]:
    return n.default()


@onnx_op("GlobalLpPool", since=1)
def global_lp_pool_1(n: NodeCtx) -> list[Value]:
    return n.emit("GlobalLpPool", n.inputs, _int_p(n, _only(n, ("p",))))


@onnx_op("GlobalLpPool", since=2)
def global_lp_pool_2(n: NodeCtx) -> list[Value]:
    return n.default()


# --- GridSample / RoiAlign ----------------------------------------------------------------------------

_GRID_MODES_16 = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}


@onnx_op("GridSample", since=16)
def grid_sample_16(n: NodeCtx) -> list[Value]:
    attrs = _only(n, ("align_corners", "mode", "padding_mode"))
    mode = attrs.get("mode", "bilinear")
    if mode not in _GRID_MODES_16:
        raise n.fail(f"mode '{mode}' is not defined for GridSample-16 (bilinear, nearest, bicubic)")
    attrs["mode"] = _GRID_MODES_16[mode]
    x = n.input(0)
    if x is not None and x.rank is not None and x.rank != 4:
        raise n.fail(f"GridSample-16 takes 4-D input, got rank {x.rank}")
    return n.emit("GridSample", n.inputs, attrs)


@onnx_op("GridSample", since=20)
def grid_sample_20(n: NodeCtx) -> list[Value]:
    return n.default()


@onnx_op("RoiAlign", since=10)
def roi_align_10(n: NodeCtx) -> list[Value]:
    """RoiAlign-10 did not shift RoI coordinates by half a pixel (today's 'output_half_pixel')."""
    attrs = _only(n, ("mode", "output_height", "output_width", "sampling_ratio", "spatial_scale"))
    attrs["coordinate_transformation_mode"] = "output_half_pixel"
    return n.emit("RoiAlign", n.inputs, attrs)


@onnx_op("RoiAlign", since=16)
def roi_align_16(n: NodeCtx) -> list[Value]:
    return n.default()


# --- Resize / Upsample --------------------------------------------------------------------------------

_RESIZE_11 = ("coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside", "extrapolation_value",
              "mode", "nearest_mode")
_RESIZE_18 = (*_RESIZE_11, "antialias", "axes", "keep_aspect_ratio_policy")


def _legacy(n: NodeCtx, x: Value | None, scales: Value | None, mode: str) -> list[Value]:
    """Resize-10 and Upsample: asymmetric coordinates; nearest floors when upscaling and ceils when
    downscaling (per axis, as onnxruntime does)."""
    if mode not in ("nearest", "linear"):
        raise n.fail(f"mode '{mode}' is not supported (nearest, linear)")
    attrs: dict[str, Any] = {"mode": mode, "coordinate_transformation_mode": "asymmetric"}
    if mode == "nearest":
        attrs["nearest_mode"] = _legacy_rounding(const_value(scales))
    return n.emit("Resize", [x, None, scales, None], attrs)


def _legacy_rounding(const: Any) -> str:
    if not isinstance(const, torch.Tensor):
        return "simple"
    vals = [float(v) for v in const.reshape(-1).tolist()]
    if all(v >= 1 for v in vals):
        return "floor"
    if all(v <= 1 for v in vals):
        return "ceil"
    return "simple"


@onnx_op("Resize", since=10)
def resize_10(n: NodeCtx) -> list[Value]:
    attrs = _only(n, ("mode",))
    return _legacy(n, n.input(0), n.input(1), attrs.get("mode", "nearest"))


@onnx_op("Resize", since=11)
def resize_11(n: NodeCtx) -> list[Value]:
    attrs = _only(n, _RESIZE_11 if n.since < 18 else _RESIZE_18)
    if attrs.get("coordinate_transformation_mode") == "half_pixel_symmetric" and n.since < 19:
        raise n.fail("coordinate_transformation_mode 'half_pixel_symmetric' is defined from Resize-19 on")
    if attrs.get("coordinate_transformation_mode") == "tf_half_pixel_for_nn":
        if n.since != 11:
            raise n.fail("coordinate_transformation_mode 'tf_half_pixel_for_nn' was removed in Resize-13")
        _tf_half_pixel_for_nn(n, attrs)
    inputs = [n.input(0)] + [_drop_empty(n.input(i)) for i in (1, 2, 3)]
    return n.emit("Resize", inputs, attrs)


def _tf_half_pixel_for_nn(n: NodeCtx, attrs: dict[str, Any]) -> None:
    """x = (y + 0.5) / scale is half_pixel's x + 0.5: rounding it is another rounding of half_pixel's x."""
    nearest = attrs.get("nearest_mode", "round_prefer_floor")
    equivalent = {"floor": "round_prefer_ceil", "round_prefer_floor": "ceil"}
    if attrs.get("mode", "nearest") != "nearest" or nearest not in equivalent:
        raise n.fail(f"tf_half_pixel_for_nn is supported with mode 'nearest' and nearest_mode floor or "
                     f"round_prefer_floor, not {attrs.get('mode', 'nearest')}/{nearest}")
    attrs["coordinate_transformation_mode"] = "half_pixel"
    attrs["nearest_mode"] = equivalent[nearest]


def _drop_empty(v: Value | None) -> Value | None:
    """Constant empty roi/scales/sizes mean 'not given'."""
    if v is None:
        return None
    data = const_value(v)
    if isinstance(data, torch.Tensor) and data.numel() == 0:
        return None
    shape = v.shape if v.is_tensor else None
    if shape is not None and 0 in shape:
        return None
    return v


@onnx_op("Upsample", since=1)
def upsample_1(n: NodeCtx) -> list[Value]:
    attrs = _only(n, ("height_scale", "width_scale", "mode"))
    mode = {"nearest": "nearest", "bilinear": "linear"}.get(attrs.get("mode", "nearest"))
    if mode is None:
        raise n.fail(f"mode '{attrs.get('mode')}' is not defined for Upsample-1 (nearest, bilinear)")
    if "height_scale" not in attrs or "width_scale" not in attrs:
        raise n.fail("Upsample-1 needs height_scale and width_scale")
    hw = [float(attrs["height_scale"]), float(attrs["width_scale"])]
    scales = n.const([1.0, 1.0, *hw], DType.FLOAT32, "scales")
    return _legacy(n, n.input(0), scales, mode)


@onnx_op("Upsample", since=7)
def upsample_7(n: NodeCtx) -> list[Value]:
    attrs = _only(n, ("mode", "scales"))
    if "scales" not in attrs:
        raise n.fail("Upsample-7 needs the scales attribute")
    scales = n.const([float(s) for s in attrs["scales"]], DType.FLOAT32, "scales")
    return _legacy(n, n.input(0), scales, attrs.get("mode", "nearest"))


@onnx_op("Upsample", since=9)
def upsample_9(n: NodeCtx) -> list[Value]:
    attrs = _only(n, ("mode",))
    return _legacy(n, n.input(0), n.input(1), attrs.get("mode", "nearest"))
