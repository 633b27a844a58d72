"""INT8 GEMMs: Q/DQ-fed Gemm/MatMul layers folded into "quantized" Fused nodes (the reference gives the same
results bit for bit), and `cuda.int8_gemm` (torch's _int_mm, which also runs on CPU tensors) matching the reference
on them, epilogues included; what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx, run_nodes
from kiln.kernels import registry
from kiln.passes.manager import PassContext
from kiln.passes.pipeline import optimize
from kiln.precision.quantize import fold_quantized, quantize_graph

F32 = DType.FLOAT32
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _mlp(batch: object = 32) -> Graph:
    """x -> fc1 (MatMul + bias + Relu) -> fc2 (MatMul + bias + residual x) -> head (Gemm transB, bias)."""
    g = Graph()
    gen = torch.Generator().manual_seed(0)
    x = g.add_input("x", TensorType(F32, (batch, 64)))
    (h,) = g.add("MatMul", [x, g.add_initializer("w1", torch.randn(64, 128, generator=gen) * 0.1)], name="fc1")
    (h,) = g.add("Add", [h, g.add_initializer("b1", torch.randn(128, generator=gen))], name="fc1_bias")
    (h,) = g.add("Relu", [h], name="fc1_relu")
    (h,) = g.add("MatMul", [h, g.add_initializer("w2", torch.randn(128, 64, generator=gen) * 0.1)], name="fc2")
    (h,) = g.add("Add", [h, g.add_initializer("b2", torch.randn(64, generator=gen))], name="fc2_bias")
    (h,) = g.add("Add", [h, x], name="residual")
    (y,) = g.add("Gemm", [h, g.add_initializer("w3", torch.randn(16, 64, generator=gen) * 0.1),
                          g.add_initializer("b3", torch.randn(16, generator=gen))], {"transB": 1}, name="head",
                 outputs=["y"])
    g.outputs.append(y)
    optimize(g, PassContext(device="cuda"))
    return g


def _quantized() -> Graph:
    g = _mlp()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32))
    env = run_nodes(g.nodes, {g.inputs[0]: x})  # every activation, for min-max scales
    scales = {v.name: float(t.abs().max()) / 127 for v, t in env.items() if isinstance(t, torch.Tensor)}
    assert len(quantize_graph(g, scales).layers) == 3
    return g


def _feeds(seed: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((32, 64)).astype(np.float32)}


def test_folding_keeps_the_results_bit_for_bit() -> None:
    g = _quantized()
    before = Interpreter(g).run(_feeds())["y"]
    folded = fold_quantized(g)
    assert len(folded) == 3 and all(n.op != "DequantizeLinear" for n in g.nodes)
    kinds = [n.attrs["kind"] for n in g.nodes if n.op == "Fused"]
    assert kinds.count("quantized") == 3
    np.testing.assert_array_equal(Interpreter(g).run(_feeds())["y"], before)


@pytest.fixture
def no_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Epilogue steps through the op table (the generated kernels need a GPU)."""
    import kiln.kernels.pointwise as pw

    monkeypatch.setattr(pw, "triton_available", lambda: False)


def test_the_int8_gemm_matches_the_reference_on_every_folded_layer(no_triton: None) -> None:
    g = _quantized()
    fold_quantized(g)
    t = registry.get("cuda.int8_gemm")
    env = {"x": torch.from_numpy(_feeds()["x"])}
    values = {v: env[v.name] for v in g.inputs}
    checked = 0
    for n in g.nodes:
        args = [None if v is None else (v.data if v.data is not None else values[v]) for v in n.inputs]
        want = OPS[n.op].ref(RefCtx(n), list(args))
        if n.op == "Fused" and n.attrs["kind"] == "quantized":
            assert t.applicable(n, CUDA) and t.applicable(n, CPU)
            got = t.build(n, {}, CPU)(list(args))[0]
            torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
            checked += 1
        values.update(zip(n.outputs, want))
    assert checked == 3


def test_small_batches_take_the_float_path_with_the_same_result(no_triton: None) -> None:
    g = _quantized()
    fold_quantized(g)
    n = next(n for n in g.nodes if n.op == "Fused" and n.attrs["kind"] == "quantized")
    xq = torch.randint(-127, 128, (4, 64), dtype=torch.int8)  # M = 4 <= 16: _int_mm's minimum
    args = [xq if v is n.inputs[0] else v.data for v in n.inputs]
    assert all(a is not None for a in args)
    want = OPS["Fused"].ref(RefCtx(n), list(args))[0]
    got = registry.get("cuda.int8_gemm").build(n, {}, CPU)(list(args))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_not_applicable_to_float_or_epilogue_nodes() -> None:
    g = _mlp()
    t = registry.get("cuda.int8_gemm")
    assert not any(t.applicable(n, CUDA) for n in g.nodes)


def test_an_int8_build_runs_its_gemms_on_the_int8_tactic(tmp_path) -> None:
    """End to end on CPU: the builder folds the layers, picks cuda.int8_gemm (level 0: by rank, no timing), and
    the engine matches the quantized graph run through the references."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((256, 256)) * 0.05).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((256, 64)) * 0.05).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu1"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    model = helper.make_model(helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512, 64])], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    for i in range(4):
        np.save(tmp_path / f"c{i}.npy", rng.standard_normal((512, 256)).astype(np.float32))
    engine = kiln.build(model, kiln.BuilderConfig(precision="int8", calibration=str(tmp_path), opt_level=0))
    assert engine.plan.stats["precision"]["int8_gemm_layers"] == 2
    quantized = [n for n in engine.plan.graph.nodes if n.op == "Fused" and n.attrs["kind"] == "quantized"]
    assert len(quantized) == 2
    chosen = [c.tactic for n, c in zip(engine.plan.graph.nodes, engine.plan.choices[0]) if n in quantized]
    assert chosen == ["cuda.int8_gemm", "cuda.int8_gemm"]
    assert engine.plan.stats["flops"]["by_precision"] == {"int8": 2 * 512 * 256 * (256 + 64)}
    x = rng.standard_normal((512, 256)).astype(np.float32)
    got = engine.create_context().run({"x": x})["y"]
    want = Interpreter(engine.plan.graph).run({"x": x})["y"]  # the quantized graph through the references
    # fc1's output differs from the reference's in the last float bits (an exact int32 sum, then one multiply);
    # now and then that moves one of fc2's inputs across a rounding boundary of its int8 quantization, which
    # shifts that row by about one quantization step times a weight. Everything else agrees to float rounding.
    close = np.isclose(got, want, rtol=1e-4, atol=1e-4)
    assert close.mean() > 0.99, close.mean()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2)
