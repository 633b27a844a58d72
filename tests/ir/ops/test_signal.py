"""DFT, STFT, window functions and MelWeightMatrix: inference and results against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ShapeError, UnsupportedError

F = DType.FLOAT32
RNG = np.random.default_rng(0)


def _i64(g: Graph, name: str, v: int) -> object:
    return g.add_initializer(name, torch.tensor(v, dtype=torch.int64))


def _pairs(z: np.ndarray) -> np.ndarray:
    return np.stack([z.real, z.imag], axis=-1).astype(np.float32)


def _dft(x: np.ndarray, axis: int | None, length: int | None, **attrs: int) -> tuple[np.ndarray, tuple]:
    g = Graph()
    xv = g.add_input("x", TensorType(F, x.shape))
    n = None if length is None else _i64(g, "n", length)
    ins = [xv, n, None if axis is None else _i64(g, "axis", axis)]
    (y,) = g.add("DFT", ins, attrs, outputs=["y"])
    g.outputs = [y]
    return Interpreter(g).run({"x": x})["y"], y.shape


@pytest.mark.parametrize(("axis", "length", "onesided"),
                         [(None, None, 0), (1, None, 0), (-3, 6, 0), (2, 3, 1), (1, None, 1)])
def test_forward_dft_of_real_signals(axis: int | None, length: int | None, onesided: int) -> None:
    x = RNG.standard_normal((2, 4, 5, 1)).astype(np.float32)
    a = (-2 if axis is None else axis) % 4
    z = np.fft.fft(x[..., 0], n=length, axis=a)
    if onesided:
        z = np.take(z, range(z.shape[a] // 2 + 1), axis=a)
    got, shape = _dft(x, axis, length, onesided=onesided)
    assert shape == got.shape
    np.testing.assert_allclose(got, _pairs(z), atol=1e-5)


def test_inverse_dft_complex_and_irfft() -> None:
    z = RNG.standard_normal((3, 8)) + 1j * RNG.standard_normal((3, 8))
    got, shape = _dft(_pairs(z), 1, None, inverse=1)
    np.testing.assert_allclose(got, _pairs(np.fft.ifft(z, axis=1)), atol=1e-6)
    half = np.fft.rfft(RNG.standard_normal((3, 10)), axis=1)  # 6 bins
    got, shape = _dft(_pairs(half), 1, None, inverse=1, onesided=1)
    assert shape == (3, 10, 1)
    np.testing.assert_allclose(got[..., 0], np.fft.irfft(half, axis=1), atol=1e-5)
    got, shape = _dft(_pairs(half), 1, 9, inverse=1, onesided=1)
    assert shape == (3, 9, 1)
    np.testing.assert_allclose(got[..., 0], np.fft.irfft(half, n=9, axis=1), atol=1e-5)


def test_dft_inference_with_unknown_axis_length_and_rank() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F, ("B", "N", 1)))
    axis = g.add_input("axis", TensorType(DType.INT64, ()))
    (plain,) = g.add("DFT", [x, None, axis], outputs=1)
    assert plain.shape == ("B", "N", 2)
    (half,) = g.add("DFT", [x, None, axis], {"onesided": 1}, outputs=1)
    assert half.shape is not None and half.shape[2] == 2 and all(isinstance(d, str) for d in half.shape[:2])
    (sym,) = g.add("DFT", [x], {"onesided": 1}, outputs=1)
    assert sym.shape == ("B", "floor(N/2)+1", 2)
    (unknown,) = g.add("DFT", [g.add_input("u", TensorType(F, None))], outputs=1)
    assert unknown.shape is None
    with pytest.raises(ShapeError, match="axis 2 is out of range"):
        g.add("DFT", [x, None, _i64(g, "bad", 2)], outputs=1)  # type: ignore[list-item]
    with pytest.raises(ShapeError, match="must be a float tensor"):
        g.add("DFT", [g.add_input("i", TensorType(DType.INT32, (4, 1)))], outputs=1)


def test_dft17_axis_attribute_becomes_an_input() -> None:
    node = helper.make_node("DFT", ["x"], ["y"], axis=2)
    graph = helper.make_graph([node], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = import_model(m)
    assert g.outputs[0].shape == (1, 3, 4, 2)
    x = RNG.standard_normal((1, 3, 4, 1)).astype(np.float32)
    got = Interpreter(g).run({"x": x})["y"]
    np.testing.assert_allclose(got, _pairs(np.fft.fft(x[..., 0], axis=2)), atol=1e-5)
    m.graph.node[0].attribute.append(helper.make_attribute("normalize", 1))
    with pytest.raises(UnsupportedError, match="'normalize' is not part of DFT-17"):
        import_model(m)


@pytest.mark.parametrize(("window", "frame", "onesided"), [(False, 8, 1), (True, None, 1), (True, 8, 0)])
def test_stft_matches_framed_numpy_fft(window: bool, frame: int | None, onesided: int) -> None:
    sig = RNG.standard_normal((2, 30, 1)).astype(np.float32)
    win = np.hanning(8).astype(np.float32)
    g = Graph()
    x = g.add_input("x", TensorType(F, (2, 30, 1)))
    ins = [x, _i64(g, "step", 5), g.add_initializer("w", torch.from_numpy(win)) if window else None,
           None if frame is None else _i64(g, "len", frame)]
    (y,) = g.add("STFT", ins, {"onesided": onesided}, outputs=["y"])
    bins = 5 if onesided else 8
    assert y.shape == (2, 5, bins, 2)
    g.outputs = [y]
    got = Interpreter(g).run({"x": sig})["y"]
    frames = np.stack([sig[:, i * 5:i * 5 + 8, 0] for i in range(5)], axis=1) * (win if window else 1)
    np.testing.assert_allclose(got, _pairs(np.fft.fft(frames, axis=-1)[..., :bins]), atol=1e-5)


def test_stft_with_runtime_step_has_fresh_dims() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F, ("B", "T", 1)))
    step = g.add_input("step", TensorType(DType.INT64, ()))
    (y,) = g.add("STFT", [x, step, None, _i64(g, "len", 16)], outputs=1)  # type: ignore[list-item]
    assert y.shape is not None and y.shape[0] == "B" and isinstance(y.shape[1], str) and y.shape[2:] == (9, 2)


@pytest.mark.parametrize("periodic", [0, 1])
@pytest.mark.parametrize(("op", "coeffs"), [("HannWindow", (0.5, 0.5)), ("HammingWindow", (25 / 46, 21 / 46)),
                                            ("BlackmanWindow", (0.42, 0.5, 0.08))])
def test_windows(op: str, coeffs: tuple, periodic: int) -> None:
    g = Graph()
    (w,) = g.add(op, [_i64(g, "size", 7)], {"periodic": periodic, "output_datatype": DType.FLOAT64},  # type: ignore[list-item]
                 outputs=["w"])
    assert w.type == TensorType(DType.FLOAT64, (7,))
    g.outputs = [w]
    got = Interpreter(g).run({})["w"]
    n, denom = np.arange(7), 7 if periodic else 6
    want = sum((-1) ** k * a * np.cos(2 * np.pi * k * n / denom) for k, a in enumerate(coeffs))
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_window_size_at_run_time_and_bad_types() -> None:
    g = Graph()
    size = g.add_input("size", TensorType(DType.INT32, ()))
    (w,) = g.add("HannWindow", [size], {"periodic": 0}, outputs=["w"])
    assert w.shape is not None and isinstance(w.shape[0], str)
    g.outputs = [w]
    assert Interpreter(g).run({"size": np.array(1, np.int32)})["w"].tolist() == [1.0]
    assert Interpreter(g).run({"size": np.array(0, np.int32)})["w"].shape == (0,)
    with pytest.raises(ShapeError, match="size must be int32 or int64"):
        g.add("HannWindow", [g.add_input("f", TensorType(F, ()))], outputs=1)


def test_mel_weight_matrix_shape_and_triangles() -> None:
    g = Graph()
    ins = [_i64(g, "bins", 4), _i64(g, "len", 32), _i64(g, "rate", 16000),
           g.add_initializer("lo", torch.tensor(100.0)), g.add_initializer("hi", torch.tensor(7000.0))]
    (m,) = g.add("MelWeightMatrix", ins, outputs=["m"])  # type: ignore[arg-type]
    assert m.type == TensorType(F, (17, 4))
    g.outputs = [m]
    w = Interpreter(g).run({})["m"]
    mel = np.linspace(2595 * np.log10(1 + 100 / 700), 2595 * np.log10(1 + 7000 / 700), 7)[:6]
    edges = np.floor(33 * 700 * (10 ** (mel / 2595) - 1) / 16000).astype(int)
    for i in range(4):
        left, center, right = edges[i:i + 3]
        assert w[center, i] == 1.0
        assert np.all(w[:left, i] == 0) and np.all(w[right:, i] == 0)
        if center > left:
            rise = (np.arange(left, center + 1) - left) / (center - left)
            np.testing.assert_allclose(w[left:center + 1, i], rise, rtol=1e-6)
        fall = (right - np.arange(center, right)) / (right - center)
        np.testing.assert_allclose(w[center:right, i], fall, rtol=1e-6)
