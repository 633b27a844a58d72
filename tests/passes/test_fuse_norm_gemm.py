"""fuse_norm_gemm: a LayerNorm/RMSNorm over the last axis and the MatMul/Gemm reading its rows -> Fused[normalized]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import kiln
from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node, Value
from kiln.ir.interpreter import Interpreter
from kiln.passes.epilogue_fusion import epilogue_fusion
from kiln.passes.fuse_norm_gemm import fuse_norm_gemm
from kiln.passes.manager import PassContext
from kiln.passes.pipeline import LATE, optimize_late
from tests.passes.same_function import randn, run_checked

F32 = DType.FLOAT32
K, N = 16, 12
FEEDS = [{"x": randn(2, 5, K) * 3 + 1}, {"x": randn(1, 5, K, seed=1)}]


def _c(g: Graph, name: str, *shape: int, seed: int = 0) -> Value:
    return g.add_initializer(name, torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5)


def _graph() -> tuple[Graph, Value]:
    g = Graph()
    return g, g.add_input("x", TensorType(F32, ("B", 5, K)))


def _ln(g: Graph, x: Value, **attrs: object) -> Node:
    (y, *_) = g.add("LayerNormalization", [x, _c(g, "gamma", K, seed=1), _c(g, "beta", K, seed=2)], dict(attrs),
                    name="ln")
    assert y.producer is not None
    return y.producer


def _normalized(g: Graph) -> list[Node]:
    return [n for n in g.nodes if n.op == "Fused" and n.attrs["kind"] == "normalized"]


def _late(g: Graph) -> None:
    epilogue_fusion(g)
    run_checked(g, [fuse_norm_gemm], FEEDS)


def test_pre_ln_ffn_up_becomes_one_node_with_the_epilogue() -> None:
    g, x = _graph()
    h = _ln(g, x).outputs[0]
    y = g.add("MatMul", [h, _c(g, "w", K, N, seed=3)], name="mm")[0]
    y = g.add("Add", [y, _c(g, "b", N, seed=4)], name="bias")[0]
    g.outputs.append(g.add("Gelu", [y], name="gelu")[0])
    _late(g)
    (node,) = _normalized(g)
    assert [m.op for m in node.attrs["body"].nodes] == ["LayerNormalization", "MatMul", "Add", "Gelu"]
    assert len(g.nodes) == 1 and len(node.outputs) == 1


def test_post_ln_rows_read_elsewhere_are_a_second_output_first() -> None:
    g, x = _graph()
    h = _ln(g, x).outputs[0]
    y = g.add("MatMul", [h, _c(g, "w", K, N, seed=3)], name="qkv")[0]
    z = g.add("Add", [h, _c(g, "r", K, seed=5)], name="residual")[0]
    g.outputs += [y, z]
    _late(g)
    (node,) = _normalized(g)
    assert node.outputs[0] is h and len(node.outputs) == 2
    assert node.attrs["body"].outputs[0] is node.attrs["body"].nodes[0].outputs[0]


def test_rms_norm_and_a_gemm_fuse() -> None:
    g, x = _graph()
    x2 = g.add("Reshape", [x, g.add_initializer("shape", torch.tensor([-1, K]))], name="flat")[0]
    h = g.add("RMSNormalization", [x2, _c(g, "gamma", K, seed=1)], name="rms")[0]
    g.outputs.append(g.add("Gemm", [h, _c(g, "w", N, K, seed=3), _c(g, "c", N, seed=4)], {"transB": 1},
                           name="fc")[0])
    _late(g)
    assert len(_normalized(g)) == 1


def _unfused(build: object) -> None:
    g, x = _graph()
    build(g, x)  # type: ignore[operator]
    epilogue_fusion(g)
    assert not fuse_norm_gemm(g).changed and not _normalized(g)


def test_not_fused_when_the_norm_is_not_over_the_last_axis_alone() -> None:
    def build(g: Graph, x: Value) -> None:
        y = g.add("LayerNormalization", [x, _c(g, "gamma", 5, K), _c(g, "beta", 5, K)], {"axis": 1}, name="ln")[0]
        g.outputs.append(g.add("MatMul", [y, _c(g, "w", K, N)], name="mm")[0])
    _unfused(build)


def test_not_fused_when_the_statistics_are_read() -> None:
    def build(g: Graph, x: Value) -> None:
        y, mean, _ = g.add("LayerNormalization", [x, _c(g, "gamma", K), _c(g, "beta", K)], name="ln")
        g.outputs += [g.add("MatMul", [y, _c(g, "w", K, N)], name="mm")[0], mean]
    _unfused(build)


def test_not_fused_when_the_weight_is_computed_or_the_rows_are_also_the_residual() -> None:
    def computed(g: Graph, x: Value) -> None:
        y = _ln(g, x).outputs[0]
        w = g.add("Relu", [g.add_input("w", TensorType(F32, (K, N)))], name="relu")[0]
        g.outputs.append(g.add("MatMul", [y, w], name="mm")[0])

    def residual(g: Graph, x: Value) -> None:
        y = _ln(g, x).outputs[0]
        z = g.add("MatMul", [y, _c(g, "w", K, K)], name="mm")[0]
        g.outputs.append(g.add("Add", [z, y], name="res")[0])

    _unfused(computed)
    _unfused(residual)


def test_not_fused_when_another_gemm_input_comes_from_the_rows() -> None:
    def build(g: Graph, x: Value) -> None:
        y = _ln(g, x).outputs[0]
        z = g.add("MatMul", [y, _c(g, "w", K, K)], name="mm")[0]
        s = g.add("Sigmoid", [y], name="gate")[0]  # computed from the rows: fusing would be a cycle
        g.outputs.append(g.add("Mul", [z, s], name="gated")[0])
    _unfused(build)


def test_the_late_list_fuses_on_gpu_builds_only() -> None:
    assert [name for name, _ in LATE] == ["extend_epilogues", "channel_scale", "fuse_residual_norm", "fuse_norm_gemm",
                                          "specialize_bodies"]
    for device, fused in (("cpu", 0), ("cuda", 1)):
        g, x = _graph()
        h = _ln(g, x).outputs[0]
        g.outputs.append(g.add("MatMul", [h, _c(g, "w", K, N)], name="mm")[0])
        optimize_late(g, PassContext(device=device))
        assert len(_normalized(g)) == fused


def test_a_normalized_node_survives_the_engine_file_and_runs(tmp_path: Path) -> None:
    """Built by hand here (the pass runs in GPU builds only): the engine file stores the body, the loaded engine
    runs it (the reference, on the CPU) and both outputs match the unfused graph."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 5, K)))
    h = _ln(g, x).outputs[0]
    y = g.add("MatMul", [h, _c(g, "w", K, N, seed=3)], name="mm")[0]
    y = g.add("Add", [y, _c(g, "b", N, seed=4)], name="bias")[0]
    z = g.add("Mul", [h, _c(g, "s", K, seed=5)], name="elsewhere")[0]
    g.outputs += [y, z]
    feeds = {"x": FEEDS[0]["x"]}
    want = Interpreter(g).run(dict(feeds))
    epilogue_fusion(g)
    fuse_norm_gemm(g)
    assert len(_normalized(g)) == 1
    path = tmp_path / "normalized.kiln"
    kiln.build(g).save(path)
    engine = kiln.load(path)
    assert any(n.op == "Fused" and n.attrs["kind"] == "normalized" for n in engine.graph.nodes)
    got = engine.create_context().run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
