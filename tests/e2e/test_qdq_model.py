"""A model quantized before import (onnxruntime's quantize_static, QDQ format, symmetric int8, per-channel
weights): kiln keeps its int8 weights, folds each Q/DQ-fed Gemm/MatMul into one int8 layer run by
`cuda.int8_gemm` (torch's _int_mm, which has a CPU kernel), and agrees with onnxruntime's own int8 execution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")


def _mlp(path: Path) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((128, 256)) * 0.08).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal(256) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((256, 64)) * 0.06).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal(64) * 0.1).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
             helper.make_node("Add", ["o", "b2"], ["y"], name="fc2_bias")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 128])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


class _Reader(quantization.CalibrationDataReader):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self.data = iter([{"x": rng.standard_normal((32, 128)).astype(np.float32)} for _ in range(8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.data, None)


def test_an_ort_quantized_qdq_model_runs_on_int8_gemms(tmp_path: Path) -> None:
    float_model, qdq_model = tmp_path / "mlp.onnx", tmp_path / "mlp.qdq.onnx"
    _mlp(float_model)
    quantization.quantize_static(
        str(float_model), str(qdq_model), _Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        activation_type=quantization.QuantType.QInt8, weight_type=quantization.QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    ops = {n.op_type for n in onnx.load(qdq_model).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops

    engine = kiln.build(str(qdq_model), kiln.BuilderConfig(profiles=[{"x": ((1, 128), (64, 128), (64, 128))}],
                                                           opt_level=0))
    nodes = engine.plan.graph.nodes
    quantized = [n for n in nodes if n.op == "Fused" and n.attrs["kind"] == "quantized"]
    assert len(quantized) == 2, [n.op for n in nodes]
    chosen = {c.tactic for n, c in zip(nodes, engine.plan.choices[0]) if n in quantized}
    assert chosen == {"cuda.int8_gemm"}
    assert engine.plan.stats["precision"]["int8_folded_layers"] == 2
    assert set(engine.plan.stats["flops"]["by_precision"]) == {"int8"}

    x = np.random.default_rng(2).standard_normal((64, 128)).astype(np.float32)
    ours = engine.create_context().run({"x": x})["y"]
    theirs = ort.InferenceSession(str(qdq_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    floats = ort.InferenceSession(str(float_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # onnxruntime runs the QDQ graph on its own int8 kernels; both round the same int8 grid, so they agree far
    # more closely than either agrees with the float model
    ours_err, int8_err = np.abs(ours - theirs).max(), np.abs(theirs - floats).max()
    assert ours_err < 0.25 * int8_err, (ours_err, int8_err)
    cos = float((ours * theirs).sum() / np.linalg.norm(ours) / np.linalg.norm(theirs))
    assert cos > 0.9999, cos


def test_an_ort_dynamically_quantized_model_runs_on_int8_gemms(tmp_path: Path) -> None:
    """quantize_dynamic: DynamicQuantizeLinear (uint8 activations, computed zero point) + MatMulInteger."""
    float_model, dyn_model = tmp_path / "mlp.onnx", tmp_path / "mlp.dyn.onnx"
    _mlp(float_model)
    quantization.quantize_dynamic(str(float_model), str(dyn_model), weight_type=quantization.QuantType.QInt8)
    assert "MatMulInteger" in {n.op_type for n in onnx.load(dyn_model).graph.node}
    engine = kiln.build(str(dyn_model), kiln.BuilderConfig(profiles=[{"x": ((1, 128), (64, 128), (64, 128))}],
                                                           opt_level=0))
    chosen = [c.tactic for n, c in zip(engine.plan.graph.nodes, engine.plan.choices[0]) if n.op == "MatMulInteger"]
    assert chosen == ["cuda.matmul_integer", "cuda.matmul_integer"]
    x = np.random.default_rng(3).standard_normal((64, 128)).astype(np.float32)
    ours = engine.create_context().run({"x": x})["y"]
    theirs = ort.InferenceSession(str(dyn_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def _agrees_with_onnxruntime(engine: kiln.Engine, q_model: Path, float_model: Path, x: np.ndarray) -> None:
    """onnxruntime's int8 kernels may round an intermediate differently (its fixed-point requantization): a few
    values one quantization step apart; kiln is far closer to it than either is to the float model."""
    ours = engine.create_context().run({"x": x})["y"]
    theirs = ort.InferenceSession(str(q_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    floats = ort.InferenceSession(str(float_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ours_err, int8_err = np.abs(ours - theirs).max(), np.abs(theirs - floats).max()
    assert ours_err <= 0.5 * int8_err, (ours_err, int8_err)
    assert np.isclose(ours, theirs, rtol=1e-4, atol=1e-4).mean() > 0.95


def test_an_ort_qoperator_model_runs_qlinear_matmul_on_int8_gemms(tmp_path: Path) -> None:
    """QOperator format: QLinearMatMul between QuantizeLinear/DequantizeLinear (uint8 activations)."""
    float_model, q_model = tmp_path / "mlp.onnx", tmp_path / "mlp.qop.onnx"
    _mlp(float_model)
    quantization.quantize_static(str(float_model), str(q_model), _Reader(),
                                 quant_format=quantization.QuantFormat.QOperator, op_types_to_quantize=["MatMul"],
                                 weight_type=quantization.QuantType.QInt8)  # (its Add would be com.microsoft's)
    assert "QLinearMatMul" in {n.op_type for n in onnx.load(q_model).graph.node}
    engine = kiln.build(str(q_model), kiln.BuilderConfig(profiles=[{"x": ((1, 128), (64, 128), (64, 128))}],
                                                         opt_level=0))
    chosen = [c.tactic for n, c in zip(engine.plan.graph.nodes, engine.plan.choices[0]) if n.op == "QLinearMatMul"]
    assert chosen and set(chosen) == {"cuda.matmul_integer"}
    x = np.random.default_rng(4).standard_normal((64, 128)).astype(np.float32)
    _agrees_with_onnxruntime(engine, q_model, float_model, x)


def _cnn(path: Path) -> None:
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((8, 16, 3, 3)) * 0.1).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


class _Images(quantization.CalibrationDataReader):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        rng = np.random.default_rng(6)
        self.data = iter([{"x": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)} for _ in range(8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.data, None)


def test_an_ort_qoperator_cnn_runs_qlinear_conv_on_int8_gemms(tmp_path: Path) -> None:
    """QOperator format with convolutions: QLinearConv (uint8 activations with zero points, int8 per-channel
    weights) runs on `cuda.conv_integer` (an exact int8 GEMM over the patches) instead of the float64 reference."""
    float_model, q_model = tmp_path / "cnn.onnx", tmp_path / "cnn.qop.onnx"
    _cnn(float_model)
    quantization.quantize_static(str(float_model), str(q_model), _Images(),
                                 quant_format=quantization.QuantFormat.QOperator, op_types_to_quantize=["Conv"],
                                 weight_type=quantization.QuantType.QInt8, per_channel=True)
    assert "QLinearConv" in {n.op_type for n in onnx.load(q_model).graph.node}
    engine = kiln.build(str(q_model), kiln.BuilderConfig(profiles=[{"x": ((1, 3, 16, 16), (4, 3, 16, 16),
                                                                           (4, 3, 16, 16))}], opt_level=0))
    chosen = [c.tactic for n, c in zip(engine.plan.graph.nodes, engine.plan.choices[0]) if n.op == "QLinearConv"]
    assert len(chosen) == 2 and set(chosen) == {"cuda.conv_integer"}
    x = np.random.default_rng(7).standard_normal((4, 3, 16, 16)).astype(np.float32)
    _agrees_with_onnxruntime(engine, q_model, float_model, x)
