"""Image ops: Resize shape inference and old versions (Resize-10/11, Upsample), GridSample, AffineGrid,
RoiAlign, NonMaxSuppression and ImageDecoder on cases the ONNX backend suite does not cover, checked against
onnxruntime, PyTorch or hand-computed values."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir import symbolic as sym
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import UnsupportedError

RNG = np.random.default_rng(3)
F32 = DType.FLOAT32


def _rnd(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _f32(*v: float) -> np.ndarray:
    return np.array(v, np.float32)


def _model(op: str, inputs: dict[str, np.ndarray | None], opset: int = 22, consts: tuple[str, ...] = (),
           **attrs: Any) -> onnx.ModelProto:
    """One-node model; inputs named in `consts` become initializers, None inputs are omitted."""
    node = helper.make_node(op, [k if v is not None else "" for k, v in inputs.items()], ["y"], **attrs)
    given = {k: v for k, v in inputs.items() if v is not None}
    g = helper.make_graph(
        [node], "t",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in given.items() if k not in consts],
        [helper.make_empty_tensor_value_info("y")],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in given.items() if k in consts],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _feeds(m: onnx.ModelProto, inputs: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    names = {i.name for i in m.graph.input}
    return {k: v for k, v in inputs.items() if k in names and v is not None}


def _kiln(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(Interpreter(import_model(m)).run(feeds).values()))


def _compare(op: str, inputs: dict[str, np.ndarray | None], tol: float = 1e-5, **kw: Any) -> np.ndarray:
    m = _model(op, inputs, **kw)
    feeds = _feeds(m, inputs)
    got = _kiln(m, feeds)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)
    return got


# --- Resize inference ---------------------------------------------------------------------------------


def _resize_graph(shape: Any, *, scales: Any = None, sizes: Any = None, runtime: bool = False,
                  **attrs: Any) -> Any:
    g = Graph()
    x = g.add_input("x", TensorType(F32, shape))
    ins: list = [x, None, None, None]
    for i, vals, dt in ((2, scales, torch.float32), (3, sizes, torch.int64)):
        if vals is not None:
            t = torch.tensor(vals, dtype=dt)
            ins[i] = g.add_input(f"in{i}", TensorType(DType.from_torch(dt), tuple(t.shape))) if runtime \
                else g.add_initializer(f"in{i}", t)
    return g.add("Resize", ins, attrs)[0].type.shape


def test_resize_symbolic_scales() -> None:
    n, c, h, w = _resize_graph(("N", 3, "H", "W"), scales=[1.0, 1.0, 2.0, 0.5])
    assert (n, c) == ("N", 3)
    for v in range(1, 9):
        assert sym.evaluate(h, {"H": v}) == 2 * v and sym.evaluate(w, {"W": v}) == v // 2


def test_resize_sizes_axes_and_policy() -> None:
    assert _resize_graph((1, 3, 10, 20), sizes=[5, 5], axes=[2, 3]) == (1, 3, 5, 5)
    assert _resize_graph((1, 3, 10, 20), sizes=[5, 5], axes=[-2, -1], keep_aspect_ratio_policy="not_larger") \
        == (1, 3, 3, 5)
    assert _resize_graph((1, 3, 10, 20), sizes=[5, 5], axes=[2, 3], keep_aspect_ratio_policy="not_smaller") \
        == (1, 3, 5, 10)
    shape = _resize_graph((1, 3, "H", 20), sizes=[5, 5], axes=[2, 3], keep_aspect_ratio_policy="not_smaller")
    assert shape[:2] == (1, 3) and all(isinstance(d, str) for d in shape[2:])


def test_resize_runtime_scales_give_fresh_dims_on_resized_axes_only() -> None:
    shape = _resize_graph(("N", 3, 8, 8), scales=[2.0, 2.0], axes=[2, 3], runtime=True)
    assert shape[:2] == ("N", 3) and all(isinstance(d, str) and d.startswith("_") for d in shape[2:])
    assert _resize_graph(None, scales=[1.0, 2.0], runtime=True) is None


def test_resize_sizes_computed_from_shapes() -> None:
    nodes = [helper.make_node("Shape", ["x"], ["nc"], start=0, end=2),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest")]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, "H", 5])
    g = helper.make_graph(nodes, "t", [x], [helper.make_empty_tensor_value_info("y")],
                          initializer=[onnx.numpy_helper.from_array(np.array([7, 9], np.int64), "hw")])
    graph = import_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))
    assert graph.outputs[0].type.shape == ("N", 3, 7, 9)


# --- Resize values ------------------------------------------------------------------------------------

X = _rnd(1, 2, 5, 7)


@pytest.mark.parametrize(
    ("attrs", "sizes"),
    [
        ({"mode": "cubic", "antialias": 1}, [1, 2, 3, 12]),  # downscale one axis, upscale the other
        ({"mode": "linear", "antialias": 1}, [1, 2, 2, 3]),
        ({"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}, [1, 2, 9, 4]),
        ({"mode": "nearest", "nearest_mode": "ceil", "coordinate_transformation_mode": "asymmetric"},
         [1, 2, 8, 3]),
        ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, [1, 2, 1, 9]),
    ],
)
def test_resize_matches_onnxruntime(attrs: dict, sizes: list[int]) -> None:
    _compare("Resize", {"x": X, "roi": None, "scales": None, "sizes": np.array(sizes, np.int64)}, opset=19,
             **attrs)


def test_resize_crop_and_resize_nearest_extrapolates() -> None:
    roi = _f32(0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3)
    sizes = np.array([1, 2, 4, 6], np.int64)
    _compare("Resize", {"x": X, "roi": roi, "scales": None, "sizes": sizes}, opset=19, mode="nearest",
             coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=7.0)


def test_resize_integer_input_rounds_and_saturates() -> None:
    x = RNG.integers(0, 255, (1, 1, 4, 5)).astype(np.uint8)
    got = _compare("Resize", {"x": x, "roi": None, "scales": _f32(1, 1, 1.5, 1.7)}, tol=1.01, opset=19,
                   consts=("scales",), mode="linear")
    assert got.dtype == np.uint8


def test_resize_five_d_and_one_d() -> None:
    _compare("Resize", {"x": _rnd(1, 1, 4, 5, 6), "roi": None, "scales": _f32(1, 1, 1.5, 0.5, 2)}, opset=19,
             consts=("scales",), mode="linear")
    x = np.array([0.0, 10.0, 20.0], np.float32)
    got = _kiln(_model("Resize", {"x": x, "roi": None, "scales": _f32(2.0)}, opset=19, consts=("scales",),
                       mode="linear"), {"x": x})
    np.testing.assert_allclose(got, [0.0, 2.5, 7.5, 12.5, 17.5, 20.0])


@pytest.mark.parametrize("scales", [_f32(1, 1, 2, 3), _f32(1, 1, 0.5, 0.6), _f32(1, 1, 0.5, 2.5)])
@pytest.mark.parametrize("constant", [True, False])
def test_resize_10_legacy_rounding(scales: np.ndarray, constant: bool) -> None:
    _compare("Resize", {"x": X, "scales": scales}, opset=10, consts=("scales",) if constant else (),
             mode="nearest")


def test_upsample_versions() -> None:
    _compare("Upsample", {"x": X, "scales": _f32(1, 1, 2, 1.5)}, opset=9, mode="linear")
    _compare("Upsample", {"x": X}, opset=7, mode="nearest", scales=[1.0, 1.0, 2.0, 3.0])
    m = _model("Upsample", {"x": X}, opset=1, mode="bilinear", height_scale=2.0, width_scale=1.5)
    got = _kiln(m, {"x": X})
    want = _kiln(_model("Upsample", {"x": X}, opset=7, mode="linear", scales=[1.0, 1.0, 2.0, 1.5]), {"x": X})
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("nearest_mode", ["floor", "round_prefer_floor"])
def test_resize_11_tf_half_pixel_for_nn(nearest_mode: str) -> None:
    _compare("Resize", {"x": X, "roi": _f32(), "scales": _f32(1, 1, 1.6, 2.3)}, opset=11,
             consts=("roi", "scales"), mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn",
             nearest_mode=nearest_mode)


@pytest.mark.parametrize(
    ("opset", "attrs", "message"),
    [
        (11, {"coordinate_transformation_mode": "tf_half_pixel_for_nn", "nearest_mode": "ceil"},
         "tf_half_pixel"),
        (13, {"coordinate_transformation_mode": "tf_half_pixel_for_nn"}, "removed in Resize-13"),
        (18, {"coordinate_transformation_mode": "half_pixel_symmetric"}, "from Resize-19 on"),
        (13, {"antialias": 1}, "not defined for Resize-13"),
        (10, {"mode": "cubic"}, "not supported"),
    ],
)
def test_resize_version_checks(opset: int, attrs: dict, message: str) -> None:
    inputs: dict[str, Any] = {"x": X, "scales": _f32(1, 1, 2, 2)} if opset == 10 else \
        {"x": X, "roi": _f32(), "scales": _f32(1, 1, 2, 2)}
    with pytest.raises(UnsupportedError, match=message):
        import_model(_model("Resize", inputs, opset=opset, consts=("roi", "scales"), **attrs))


def test_resize_strings_nearest() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(DType.STRING, (2, 2)))
    scales = g.add_initializer("s", torch.tensor([1.0, 2.0]))
    attrs = {"coordinate_transformation_mode": "asymmetric"}
    g.outputs.append(g.add("Resize", [x, None, scales, None], attrs)[0])
    (y,) = Interpreter(g).run([np.array([["a", "b"], ["c", "d"]], dtype=object)])
    assert y.tolist() == [["a", "a", "b", "b"], ["c", "c", "d", "d"]]


# --- GridSample / AffineGrid --------------------------------------------------------------------------

GRID = (RNG.random((2, 4, 7, 2)) * 2.8 - 1.4).astype(np.float32)


@pytest.mark.parametrize("padding_mode", ["border", "reflection"])
@pytest.mark.parametrize("align_corners", [0, 1])
def test_grid_sample_cubic_pads_each_tap_like_pytorch(padding_mode: str, align_corners: int) -> None:
    x = _rnd(2, 3, 5, 6)
    got = _kiln(_model("GridSample", {"x": x, "g": GRID}, mode="cubic", padding_mode=padding_mode,
                       align_corners=align_corners), {"x": x, "g": GRID})
    want = torch.nn.functional.grid_sample(torch.from_numpy(x), torch.from_numpy(GRID), mode="bicubic",
                                           padding_mode=padding_mode, align_corners=bool(align_corners))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_grid_sample_one_spatial_axis() -> None:
    x = np.array([[[0.0, 10.0, 20.0, 30.0]]], np.float32)  # N=1, C=1, W=4
    grid = _f32(-1, -0.75, 0, 1, 1.5).reshape(1, 5, 1)
    got = _kiln(_model("GridSample", {"x": x, "g": grid}, align_corners=1), {"x": x, "g": grid})
    # 1.5 lands at pixel 3.75: a quarter of pixel 3, the rest of its neighbour outside (zero).
    np.testing.assert_allclose(got, [[[0.0, 3.75, 15.0, 30.0, 7.5]]], atol=1e-5)


def test_grid_sample_16_mode_names() -> None:
    x = _rnd(1, 2, 4, 5)
    for old, new in (("bilinear", "linear"), ("bicubic", "cubic"), ("nearest", "nearest")):
        a = _kiln(_model("GridSample", {"x": x, "g": GRID[:1]}, opset=16, mode=old), {"x": x, "g": GRID[:1]})
        b = _kiln(_model("GridSample", {"x": x, "g": GRID[:1]}, mode=new), {"x": x, "g": GRID[:1]})
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("align_corners", [0, 1])
def test_affine_grid_matches_pytorch(align_corners: int) -> None:
    for theta, size in ((_rnd(2, 2, 3), [2, 3, 5, 4]), (_rnd(2, 3, 4), [2, 3, 3, 5, 4])):
        size_arr = np.array(size, np.int64)
        got = _kiln(_model("AffineGrid", {"t": theta, "s": size_arr}, opset=20, align_corners=align_corners),
                    {"t": theta, "s": size_arr})
        want = torch.nn.functional.affine_grid(torch.from_numpy(theta), size,
                                               align_corners=bool(align_corners))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


# --- RoiAlign / NonMaxSuppression ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ctm", ["half_pixel", "output_half_pixel"])
def test_roi_align_adaptive_sampling(mode: str, ctm: str) -> None:
    x = _rnd(2, 3, 12, 10)
    rois = _f32(1, 1, 6, 8, 0.4, 2.6, 9.2, 11.7, 3, 3, 3.5, 3.2, -2, -3, 4, 20).reshape(4, 4)
    _compare("RoiAlign", {"x": x, "r": rois, "b": np.array([0, 1, 1, 0], np.int64)}, opset=16, mode=mode,
             coordinate_transformation_mode=ctm, output_height=3, output_width=4, spatial_scale=0.5)


def test_roi_align_10_has_no_half_pixel_shift() -> None:
    x, rois, b = _rnd(1, 2, 8, 8), _f32(1, 1, 6, 5).reshape(1, 4), np.array([0], np.int64)
    old = _kiln(_model("RoiAlign", {"x": x, "r": rois, "b": b}, opset=10, output_height=2, output_width=2),
                {"x": x, "r": rois, "b": b})
    new = _kiln(_model("RoiAlign", {"x": x, "r": rois, "b": b}, output_height=2, output_width=2,
                       coordinate_transformation_mode="output_half_pixel"), {"x": x, "r": rois, "b": b})
    np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("center", [0, 1])
def test_nms_matches_onnxruntime(center: int) -> None:
    boxes = RNG.random((2, 40, 4)).astype(np.float32) * 10
    if not center:
        boxes[..., 2:] = boxes[..., :2] + (RNG.random((2, 40, 2)).astype(np.float32) - 0.3) * 5
    scores = RNG.random((2, 3, 40)).astype(np.float32)
    scores[0, 0, :6] = 0.5  # ties resolve to the lower box index
    inputs = {"b": boxes, "s": scores, "m": np.array([6], np.int64), "i": _f32(0.3), "t": _f32(0.2)}
    _compare("NonMaxSuppression", inputs, opset=11, center_point_box=center)
    _compare("NonMaxSuppression", {"b": boxes, "s": scores}, opset=11, center_point_box=center)


def test_nms_threshold_is_strict() -> None:
    boxes = _f32(0, 0, 1, 1, 0, 0, 1, 2).reshape(1, 2, 4)  # IoU = 0.5 exactly
    scores = _f32(0.9, 0.8).reshape(1, 1, 2)
    for thr, n in ((0.5, 2), (0.49, 1)):
        inputs = {"b": boxes, "s": scores, "m": np.array([5], np.int64), "i": _f32(thr)}
        assert _kiln(_model("NonMaxSuppression", inputs, opset=11), inputs).shape == (n, 3)


# --- ImageDecoder -------------------------------------------------------------------------------------


def test_image_decoder_formats_and_garbage() -> None:
    from PIL import Image

    pixels = RNG.integers(0, 255, (5, 6, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data = np.frombuffer(buf.getvalue(), np.uint8)
    run = lambda fmt, d: _kiln(_model("ImageDecoder", {"d": d}, opset=20, pixel_format=fmt), {"d": d})  # noqa: E731
    np.testing.assert_array_equal(run("RGB", data), pixels)
    np.testing.assert_array_equal(run("BGR", data), pixels[:, :, ::-1])
    gray = run("Grayscale", data)
    assert gray.shape == (5, 6, 1)
    np.testing.assert_array_equal(gray[:, :, 0], np.asarray(Image.fromarray(pixels).convert("L")))
    assert run("RGB", np.arange(20, dtype=np.uint8)).shape == (0, 0, 3)
