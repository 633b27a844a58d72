"""INT8 GEMMs: Q/DQ-fed Gemm/MatMul layers folded into "quantized" Fused nodes (the reference gives the same
results bit for bit), and `cuda.int8_gemm` (torch's _int_mm, which also runs on CPU tensors) matching the reference
on them, epilogues included; what it refuses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import kiln
from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.ir.interpreter import Interpreter
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.passes.manager import PassContext
from kiln.passes.pipeline import optimize
from kiln.precision.quantize import fold_quantized, quantize_graph
from tests.precision.scales import minmax_scales

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
    assert len(quantize_graph(g, minmax_scales(g, x)).layers) == 3
    return g


def _feeds(seed: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((32, 64)).astype(np.float32)}


def _quantized_layers(g: Graph) -> Iterator[tuple[Node, list[Any], torch.Tensor]]:
    """Runs g through the references on _feeds(); yields each "quantized" node with its inputs and its reference
    output."""
    values: dict[Any, Any] = {g.inputs[0]: torch.from_numpy(_feeds()["x"])}
    for n in g.nodes:
        args = [None if v is None else (v.data if v.data is not None else values[v]) for v in n.inputs]
        want = OPS[n.op].ref(RefCtx(n), list(args))
        if n.op == "Fused" and n.attrs["kind"] == "quantized":
            yield n, args, want[0]
        values.update(zip(n.outputs, want))


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
    checked = 0
    for n, args, want in _quantized_layers(g):
        assert t.applicable(n, CUDA) and t.applicable(n, CPU)
        got = t.build(n, {}, CPU)(list(args))[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        checked += 1
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
    assert engine.plan.stats["precision"]["int8_folded_layers"] == 2
    quantized = [n for n in engine.plan.graph.nodes if n.op == "Fused" and n.attrs["kind"] == "quantized"]
    assert len(quantized) == 2
    chosen = [c.tactic for n, c in zip(engine.plan.graph.nodes, engine.plan.choices[0]) if n in quantized]
    assert chosen == ["cuda.int8_gemm", "cuda.int8_gemm"]
    assert engine.plan.stats["flops"]["by_precision"] == {"int8": 2 * 512 * 256 * (256 + 64)}
    from kiln.cli.build import precision_of

    assert [precision_of(n) for n in quantized] == ["int8", "int8"]  # what kiln build and kiln inspect show
    x = rng.standard_normal((512, 256)).astype(np.float32)
    got = engine.create_context().run({"x": x})["y"]
    want = Interpreter(engine.plan.graph).run({"x": x})["y"]  # the quantized graph through the references
    # fc1's output differs from the reference's in the last float bits (an exact int32 sum, then one multiply);
    # now and then that moves one of fc2's inputs across a rounding boundary of its int8 quantization, which
    # shifts that row by about one quantization step times a weight. Everything else agrees to float rounding.
    close = np.isclose(got, want, rtol=1e-4, atol=1e-4)
    assert close.mean() > 0.99, close.mean()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2)


def _matmul_integer(a_dtype: DType, za: bool) -> tuple[object, list[torch.Tensor | None]]:
    g = Graph()
    gen = torch.Generator().manual_seed(4)
    a = g.add_input("a", TensorType(a_dtype, (3, 24, 64)))
    w = g.add_initializer("w", torch.randint(-127, 128, (64, 40), generator=gen, dtype=torch.int8))
    ins = [a, w]
    if za:
        ins.append(g.add_input("za", TensorType(a_dtype, ())))
    g.outputs.extend(g.add("MatMulInteger", ins, name="mmi", outputs=1))
    lo, hi = (0, 256) if a_dtype is DType.UINT8 else (-128, 128)
    x = torch.randint(lo, hi, (3, 24, 64), generator=gen).to(a_dtype.torch)
    args: list[torch.Tensor | None] = [x, w.data]  # type: ignore[list-item]
    if za:
        args.append(torch.tensor(131 if a_dtype is DType.UINT8 else -3, dtype=a_dtype.torch))
    return g.nodes[0], args


@pytest.mark.parametrize(("a_dtype", "za"), [(DType.UINT8, True), (DType.UINT8, False), (DType.INT8, True)],
                         ids=["uint8-zero-point", "uint8", "int8-zero-point"])
def test_matmul_integer_on_int8_gemms_equals_the_reference(a_dtype: DType, za: bool) -> None:
    node, args = _matmul_integer(a_dtype, za)
    t = registry.get("cuda.matmul_integer")
    assert t.applicable(node, CUDA)
    want = OPS["MatMulInteger"].ref(RefCtx(node), list(args))[0]
    got = t.build(node, {}, CPU)(list(args))[0]  # type: ignore[arg-type]
    assert got.dtype == torch.int32 and torch.equal(got, want)  # an exact int32 identity, no rounding anywhere
    small = [args[0][:1, :2], *args[1:]]  # type: ignore[index]  # M = 2: the float64 path, still exact
    assert torch.equal(t.build(node, {}, CPU)(list(small))[0], OPS["MatMulInteger"].ref(RefCtx(node), small)[0])


@pytest.mark.parametrize("a_dtype", [DType.UINT8, DType.INT8], ids=str)
def test_qlinear_matmul_on_int8_gemms_equals_the_reference(a_dtype: DType) -> None:
    g = Graph()
    gen = torch.Generator().manual_seed(5)
    f32 = DType.FLOAT32

    def const(name: str, t: torch.Tensor) -> object:
        return g.add_initializer(name, t)

    a = g.add_input("a", TensorType(a_dtype, (40, 64)))
    ins = [a, const("sa", torch.tensor(0.02)), const("za", torch.tensor(120 if a_dtype is DType.UINT8 else -5,
                                                                         dtype=a_dtype.torch)),
           const("b", torch.randint(-127, 128, (64, 24), generator=gen, dtype=torch.int8)),
           const("sb", torch.rand(24, generator=gen) * 0.01 + 0.001), const("zb", torch.zeros(24, dtype=torch.int8)),
           const("sy", torch.tensor(0.05)), const("zy", torch.tensor(3 if a_dtype is DType.UINT8 else 0,
                                                                     dtype=a_dtype.torch))]
    g.outputs.extend(g.add("QLinearMatMul", ins, name="qmm", outputs=1))  # type: ignore[arg-type]
    node = g.nodes[0]
    lo, hi = (0, 256) if a_dtype is DType.UINT8 else (-128, 128)
    x = torch.randint(lo, hi, (40, 64), generator=gen).to(a_dtype.torch)
    args = [x, *(v.data for v in node.inputs[1:])]  # type: ignore[union-attr]
    t = registry.get("cuda.matmul_integer")
    assert t.applicable(node, CUDA) and f32 is DType.FLOAT32
    want = OPS["QLinearMatMul"].ref(RefCtx(node), list(args))[0]
    got = t.build(node, {}, CPU)(list(args))[0]
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_tactics_on_the_gpu() -> None:
    """cuBLASLt's int8 GEMM (M > 16, K and N multiples of 8) against the references, epilogues on the generated
    kernels."""
    g = _quantized()
    fold_quantized(g)
    checked = 0
    for n, args, want in _quantized_layers(g):
        cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        got = registry.get("cuda.int8_gemm").build(n, {}, CUDA)(cuda_args)[0]
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == 3
    for a_dtype in (DType.UINT8, DType.INT8):
        node, margs = _matmul_integer(a_dtype, True)
        want = OPS["MatMulInteger"].ref(RefCtx(node), list(margs))[0]
        got = registry.get("cuda.matmul_integer").build(node, {}, CUDA)([a.cuda() for a in margs])[0]  # type: ignore
        assert torch.equal(got.cpu(), want)


def test_in_a_float16_build_the_folded_layers_compute_in_float16(no_triton: None) -> None:
    """A GPU int8 build lowers what stays float to FP16 (scales included), then folds: the int8 tactic gives the
    layer's float16 result, rounded once after a float32 dequantization."""
    from kiln.precision.lower import lower_precision

    g = _quantized()
    lower_precision(g, DType.FLOAT16)
    assert len(fold_quantized(g)) == 3
    t = registry.get("cuda.int8_gemm")
    checked = 0
    for n, args, want in _quantized_layers(g):
        assert t.applicable(n, CUDA)
        got = t.build(n, {}, CPU)(list(args))[0]
        assert got.dtype == want.dtype == torch.float16
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # float16's, as the tuner's tolerance
        checked += 1
    assert checked == 3


def test_requantizing_epilogues_keep_the_results_and_write_int8(no_triton: None) -> None:
    """fc1's and fc2's outputs are read only by the quantization for the next layer: that QuantizeLinear becomes
    their last step, the layers write int8, the reference results do not change."""
    from kiln.precision.quantize import fuse_requantize

    g = _quantized()
    fold_quantized(g)
    before = Interpreter(g).run(_feeds())["y"]
    assert len(fuse_requantize(g)) == 2
    assert sum(n.op == "QuantizeLinear" for n in g.nodes) == 1  # only the graph input's is left
    np.testing.assert_array_equal(Interpreter(g).run(_feeds())["y"], before)
    t = registry.get("cuda.int8_gemm")
    ends_int8 = 0
    for n, args, want in _quantized_layers(g):
        if want.dtype != torch.int8:
            continue
        assert t.applicable(n, CUDA)
        got = t.build(n, {}, CPU)(list(args))[0]
        diff = (got.int() - want.int()).abs()
        assert got.dtype == torch.int8 and int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.99
        ends_int8 += 1
    assert ends_int8 == 2
