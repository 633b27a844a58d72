"""onnxruntime's QOperator-format quantized ops (com.microsoft QLinearAdd, QLinearMul, QLinearSigmoid,
QLinearLeakyRelu, QLinearSoftmax, QLinear(Global)AveragePool, QLinearConcat, QGemm), each against onnxruntime, and
a CNN quantized by onnxruntime's own `quantize_static` in that format, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import kiln

MS = "com.microsoft"
U8, I8, F32 = TensorProto.UINT8, TensorProto.INT8, TensorProto.FLOAT


def _q(shape: tuple[int, ...], dtype: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape).astype(np.uint8) if dtype == U8 else \
        rng.integers(-128, 128, shape).astype(np.int8)


def _run(op: str, inputs: list[tuple[str, Any]], out_type: int, exact: Any = None, **attrs: Any) -> np.ndarray:
    """One node: inputs as (name, array) - scales and zero points as constants, the rest graph inputs; kiln's
    output against onnxruntime's. Quantized outputs: onnxruntime's kernels fold the scales and round in their own
    order, so they may differ by one step; `exact(feeds)` - the op's definition, QuantizeLinear(f(DequantizeLinear
    (inputs))) in ONNX's float32 arithmetic - must then equal kiln's bit for bit. Returns kiln's output."""
    feeds, inits, names = {}, [], []
    for name, a in inputs:
        names.append(name if a is not None else "")
        if a is None:
            continue
        a = np.asarray(a)
        if name.endswith(("scale", "zero_point")):
            inits.append(onnx.numpy_helper.from_array(a, name))
        else:
            feeds[name] = a
    while names and not names[-1]:
        names.pop()
    node = helper.make_node(op, names, ["y"], domain=MS, **attrs)
    elem = {np.dtype(np.uint8): U8, np.dtype(np.int8): I8, np.dtype(np.float32): F32,
            np.dtype(np.int32): TensorProto.INT32}
    g = helper.make_graph([node], "q", [helper.make_tensor_value_info(k, elem[v.dtype], list(v.shape))
                                        for k, v in feeds.items()],
                          [helper.make_tensor_value_info("y", out_type, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    got = np.asarray(kiln.run_reference(model, feeds)["y"])
    if any(a is None for _, a in inputs):  # onnxruntime aborts on absent zero points: kiln's own answer only
        return got
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    if want.dtype in (np.uint8, np.int8):
        assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
        assert exact is not None
        np.testing.assert_array_equal(got, exact(dict(inputs)))
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    return got


def _deq(v: dict, x: str, s: str, z: str) -> np.ndarray:
    """DequantizeLinear as ONNX defines it: float32 (x - zero point) * scale."""
    return ((v[x].astype(np.int32) - np.asarray(v[z]).astype(np.int32)).astype(np.float32) *
            np.asarray(v[s], np.float32))


def _quant(y: np.ndarray, v: dict, s: str, z: str, dtype: Any) -> np.ndarray:
    """QuantizeLinear as ONNX defines it: the float32 quotient rounded half to even, plus the zero point,
    saturated."""
    info = np.iinfo(dtype)
    q = np.round(y.astype(np.float32) / np.asarray(v[s], np.float32)).astype(np.float64)
    return np.clip(q + np.asarray(v[z]).astype(np.float64), info.min, info.max).astype(dtype)


def _sc(v: float) -> np.ndarray:
    return np.array(v, np.float32)


@pytest.mark.parametrize("dtype", [U8, I8], ids=["uint8", "int8"])
@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
def test_binary(op: str, dtype: int) -> None:
    def zp(v: int) -> np.ndarray:
        return np.array(v, np.uint8 if dtype == U8 else np.int8)

    f = np.add if op == "QLinearAdd" else np.multiply
    _run(op, [("A", _q((2, 3, 4, 5), dtype, 1)), ("A_scale", _sc(0.02)), ("A_zero_point", zp(3)),
              ("B", _q((3, 1, 1), dtype, 2)), ("B_scale", _sc(0.05)), ("B_zero_point", zp(-2 if dtype == I8 else 9)),
              ("C_scale", _sc(0.04 if op == "QLinearAdd" else 0.3)), ("C_zero_point", zp(1))], dtype,
         exact=lambda v: _quant(f(_deq(v, "A", "A_scale", "A_zero_point"), _deq(v, "B", "B_scale", "B_zero_point")),
                                v, "C_scale", "C_zero_point", v["A"].dtype))


@pytest.mark.parametrize("op,attrs", [("QLinearSigmoid", {}), ("QLinearLeakyRelu", {"alpha": 0.2})])
def test_unary(op: str, attrs: dict) -> None:
    """Against onnxruntime with zero points; without them (onnxruntime aborts there) kiln takes 0 of the input's
    type: the same output as explicit zeros."""
    def f(x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-x)) if op == "QLinearSigmoid" else np.where(x >= 0, x, x * np.float32(0.2))

    x = _q((4, 6), I8, 3)
    zeros = [("X", x), ("X_scale", _sc(0.05)), ("X_zero_point", np.array(0, np.int8)), ("Y_scale", _sc(0.01)),
             ("Y_zero_point", np.array(0, np.int8))]
    explicit = _run(op, zeros, I8, exact=lambda v: _quant(f(_deq(v, "X", "X_scale", "X_zero_point")), v, "Y_scale",
                                                          "Y_zero_point", np.int8), **attrs)
    shifted = [("X", x), ("X_scale", _sc(0.05)), ("X_zero_point", np.array(-3, np.int8)), ("Y_scale", _sc(0.01)),
               ("Y_zero_point", np.array(5, np.int8))]
    _run(op, shifted, I8, exact=lambda v: _quant(f(_deq(v, "X", "X_scale", "X_zero_point")), v, "Y_scale",
                                                 "Y_zero_point", np.int8), **attrs)
    absent = [("X", x), ("X_scale", _sc(0.05)), ("X_zero_point", None), ("Y_scale", _sc(0.01)),
              ("Y_zero_point", None)]
    np.testing.assert_array_equal(_run(op, absent, I8, **attrs), explicit)


@pytest.mark.parametrize("opset,axis", [(13, 1), (12, 1), (12, 2)])
def test_softmax(opset: int, axis: int) -> None:
    """Before opset 13 one softmax over every axis from `axis` on."""
    def exact(v: dict) -> np.ndarray:
        x = _deq(v, "X", "X_scale", "X_zero_point")
        flat = x.reshape(*x.shape[:axis], -1) if opset < 13 else np.moveaxis(x, axis, -1)
        e = np.exp(flat - flat.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        y = p.reshape(x.shape) if opset < 13 else np.moveaxis(p, -1, axis)
        return _quant(y, v, "Y_scale", "Y_zero_point", np.uint8)

    _run("QLinearSoftmax", [("X", _q((2, 3, 4), U8, 4)), ("X_scale", _sc(0.1)),
                            ("X_zero_point", np.array(128, np.uint8)), ("Y_scale", _sc(1 / 256)),
                            ("Y_zero_point", np.array(0, np.uint8))], U8, exact=exact, axis=axis, opset=opset)


@pytest.mark.parametrize("channels_last", [0, 1])
def test_pools(channels_last: int) -> None:
    x = _q((2, 5, 6, 4) if channels_last else (2, 4, 5, 6), U8, 5)
    common = [("X", x), ("x_scale", _sc(0.03)), ("x_zero_point", np.array(7, np.uint8)), ("y_scale", _sc(0.02)),
              ("y_zero_point", np.array(5, np.uint8))]
    def exact(v: dict) -> np.ndarray:  # the global pool's
        x = _deq(v, "X", "x_scale", "x_zero_point")
        y = x.mean((1, 2), keepdims=True) if channels_last else x.mean((2, 3), keepdims=True)
        return _quant(y, v, "y_scale", "y_zero_point", np.uint8)

    _run("QLinearGlobalAveragePool", common, U8, exact=exact, channels_last=channels_last)

    def pooled(v: dict) -> np.ndarray:  # 2x2 windows, strides (2, 1), one column of zeros padded on the left
        x = _deq(v, "X", "x_scale", "x_zero_point")
        x = np.moveaxis(x, 3, 1) if channels_last else x
        x = np.pad(x, ((0, 0), (0, 0), (0, 0), (1, 0)))
        h, w = (x.shape[2] - 2) // 2 + 1, x.shape[3] - 1
        y = np.stack([np.stack([x[:, :, 2 * i:2 * i + 2, j:j + 2].mean((2, 3)) for j in range(w)], -1)
                      for i in range(h)], -2)
        return _quant(np.moveaxis(y, 1, 3) if channels_last else y, v, "y_scale", "y_zero_point", np.uint8)

    _run("QLinearAveragePool", common, U8, exact=pooled, channels_last=channels_last, kernel_shape=[2, 2],
         strides=[2, 1], pads=[0, 1, 0, 0], count_include_pad=1)


def test_concat() -> None:
    _run("QLinearConcat", [("Y_scale", _sc(0.05)), ("Y_zero_point", np.array(2, np.int8)),
                           ("X0", _q((2, 3, 4), I8, 6)), ("X0_scale", _sc(0.03)),
                           ("X0_zero_point", np.array(-1, np.int8)), ("X1", _q((2, 2, 4), I8, 7)),
                           ("X1_scale", _sc(0.07)), ("X1_zero_point", np.array(4, np.int8))], I8, axis=1,
         exact=lambda v: _quant(np.concatenate([_deq(v, "X0", "X0_scale", "X0_zero_point"),
                                                _deq(v, "X1", "X1_scale", "X1_zero_point")], 1),
                                v, "Y_scale", "Y_zero_point", np.int8))


@pytest.mark.parametrize("form", ["quantized-out", "float-out", "per-column-transB"])
def test_qgemm(form: str) -> None:
    rng = np.random.default_rng(8)
    trans_b = int(form == "per-column-transB")
    b = _q((6, 5) if trans_b else (5, 6), I8, 9)
    b_scale = (rng.random(6) * 0.02 + 0.01).astype(np.float32) if form == "per-column-transB" else _sc(0.02)
    ins = [("A", _q((3, 5), U8, 10)), ("a_scale", _sc(0.05)), ("a_zero_point", np.array(120, np.uint8)),
           ("B", b), ("b_scale", b_scale), ("b_zero_point", np.zeros(b_scale.shape, np.int8)),
           ("C", rng.integers(-500, 500, (6,)).astype(np.int32))]
    if form != "float-out":
        ins += [("y_scale", _sc(0.2)), ("y_zero_point", np.array(100, np.uint8))]

    def exact(v: dict) -> np.ndarray:
        a = _deq(v, "A", "a_scale", "a_zero_point")
        bq = v["B"].astype(np.float64) * (v["b_scale"].astype(np.float64)[:, None] if trans_b and v["b_scale"].ndim
                                          else v["b_scale"].astype(np.float64))
        y = a @ (bq.T if trans_b else bq) + v["C"] * (np.float64(v["a_scale"]) * v["b_scale"].astype(np.float64))
        return _quant(y, v, "y_scale", "y_zero_point", np.uint8)

    _run("QGemm", ins, F32 if form == "float-out" else U8, exact=exact, transB=trans_b, alpha=1.0)


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_cnn_quantized_by_onnxruntime_in_the_qoperator_format(tmp_path: Path, per_channel: bool) -> None:
    """quantize_static(QuantFormat.QOperator) of a CNN with a residual add, a gated (x * sigmoid(x)) activation,
    pooling, a concat, a LeakyRelu and a softmax head: kiln's engine gives onnxruntime's outputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.relu(self.c1(x))
            b = torch.relu(self.c2(a)) + a
            b = torch.sigmoid(b) * b
            p = torch.nn.functional.avg_pool2d(b, 2)
            g = torch.cat([p, p * 0.5], 1).mean((2, 3))
            return torch.softmax(self.fc(torch.nn.functional.leaky_relu(g)), -1)

    torch.manual_seed(0)
    src, out = tmp_path / "cnn.onnx", tmp_path / "cnn_qop.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 16, 16),), str(src), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32)}
                            for i in range(8)])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QOperator, per_channel=per_channel)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node if n.domain == MS}
    assert {"QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearConcat", "QGemm"} <= ops, ops
    x = np.random.default_rng(9).standard_normal((1, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    engine = kiln.build(str(out), kiln.BuilderConfig())
    got = engine.create_context().run({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=0, atol=2 / 256)  # the softmax output's own step: 1/256
    assert (np.abs(got - want) < 1e-6).mean() >= 0.9
