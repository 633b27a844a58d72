"""fuse_residual_norm: the residual Add a LayerNorm/RMSNorm normalizes moves into a Fused[residual_norm] node (from
the end of a GEMM's epilogue, or a bare / pointwise Add); the node outputs the sum too when something else reads
it."""

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
from kiln.passes.pipeline import optimize_late
from kiln.passes.pointwise_fusion import pointwise_fusion
from kiln.passes.residual_norm import fuse_residual_norm
from kiln.passes.rewrite import fuse
from tests.passes.same_function import randn, run_checked

F32 = DType.FLOAT32
K, N = 16, 12
FEEDS = [{"x": randn(2, 5, K) * 3 + 1, "h": randn(2, 5, N, seed=2)}, {"x": randn(1, 5, K, seed=1),
                                                                     "h": randn(1, 5, N, seed=3)}]


def _c(g: Graph, name: str, *shape: int, seed: int = 0) -> Value:
    return g.add_initializer(name, torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5)


def _graph() -> tuple[Graph, Value, Value]:
    g = Graph()
    return g, g.add_input("x", TensorType(F32, ("B", 5, K))), g.add_input("h", TensorType(F32, ("B", 5, N)))


def _ln(g: Graph, s: Value, name: str = "ln") -> Value:
    return g.add("LayerNormalization", [s, _c(g, f"{name}.g", K, seed=1), _c(g, f"{name}.b", K, seed=2)],
                 name=name)[0]


def _kinds(g: Graph) -> list[str]:
    return [n.attrs["kind"] if n.op == "Fused" else n.op for n in g.nodes]


def _ffn_down(g: Graph, x: Value, h: Value, bias: bool = True) -> Value:
    """BERT's FFN-down: MatMul(h, W) (+ b) + x, the residual."""
    y = g.add("MatMul", [h, _c(g, "w", N, K, seed=3)], name="down")[0]
    if bias:
        y = g.add("Add", [y, _c(g, "bias", K, seed=4)], name="bias")[0]
    return g.add("Add", [y, x], name="residual")[0]


def test_post_ln_residual_leaves_the_epilogue_for_the_norm() -> None:
    g, x, h = _graph()
    g.outputs.append(_ln(g, _ffn_down(g, x, h)))
    epilogue_fusion(g)
    (result,) = run_checked(g, [fuse_residual_norm], FEEDS)
    assert result.counts == {"after_epilogue": 1}
    assert _kinds(g) == ["epilogue", "residual_norm"]
    epilogue, rn = g.nodes
    assert [m.op for m in epilogue.attrs["body"].nodes] == ["MatMul", "Add"]
    assert x not in epilogue.inputs  # the residual is no longer an epilogue operand
    assert [m.op for m in rn.attrs["body"].nodes] == ["Add", "LayerNormalization"]
    assert rn.inputs[:2] == [epilogue.outputs[0], x]


def test_an_epilogue_left_with_its_anchor_becomes_the_bare_anchor() -> None:
    g, x, h = _graph()
    g.outputs.append(_ln(g, _ffn_down(g, x, h, bias=False)))
    epilogue_fusion(g)
    run_checked(g, [fuse_residual_norm], FEEDS)
    assert _kinds(g) == ["MatMul", "residual_norm"]


def test_a_bare_add_and_a_pointwise_add_move_too() -> None:
    for fuse_pointwise in (False, True):
        g, x, _ = _graph()
        y = g.add("Relu", [x], name="relu")[0]
        s = g.add("Add", [x, g.add("Sigmoid", [y], name="sig")[0]], name="residual")[0]
        g.outputs.append(_ln(g, s))
        if fuse_pointwise:  # Relu + Sigmoid + Add as one group: the Add is not alone, nothing moves
            pointwise_fusion(g)
            assert _kinds(g)[0] == "pointwise" and not fuse_residual_norm(g).changed
            continue
        (result,) = run_checked(g, [fuse_residual_norm], FEEDS)
        assert result.counts == {"after_add": 1} and _kinds(g) == ["Relu", "Sigmoid", "residual_norm"]
    g, x, _ = _graph()
    s = g.add("Add", [x, g.add_input("r", TensorType(F32, ("B", 5, K)))], name="residual")[0]
    g.outputs.append(_ln(g, s))
    assert s.producer is not None
    fuse(g, [s.producer], "pointwise")  # a group of one Add (as a fusion that grouped it would leave it)
    assert _kinds(g) == ["pointwise", "LayerNormalization"]
    feeds = [{**f, "r": f["x"] * 0.5 + 1} for f in FEEDS]
    (result,) = run_checked(g, [fuse_residual_norm], feeds)
    assert result.counts == {"after_add": 1} and _kinds(g) == ["residual_norm"]


def _unchanged(build: object) -> None:
    g, x, h = _graph()
    build(g, x, h)  # type: ignore[operator]
    epilogue_fusion(g)
    before = _kinds(g)
    assert not fuse_residual_norm(g).changed and _kinds(g) == before


def test_left_alone_when_the_add_broadcasts_the_statistics_are_read_or_the_kernels_refuse_the_norm() -> None:
    def broadcast(g: Graph, x: Value, h: Value) -> None:
        s = g.add("Add", [x, _c(g, "row", K, seed=7)], name="shift")[0]
        g.outputs.append(_ln(g, s))
    _unchanged(broadcast)

    def stats(g: Graph, x: Value, h: Value) -> None:
        y, mean, _ = g.add("LayerNormalization", [_ffn_down(g, x, h), _c(g, "g", K), _c(g, "b", K)], name="ln")
        g.outputs += [y, mean]
    _unchanged(stats)

    def scalar_scale(g: Graph, x: Value, h: Value) -> None:  # a scale the norm kernels do not take
        g.outputs.append(g.add("LayerNormalization", [_ffn_down(g, x, h), _c(g, "g", 1)], name="ln")[0])
    _unchanged(scalar_scale)

    def half_stats(g: Graph, x: Value, h: Value) -> None:
        y = g.add("LayerNormalization", [_ffn_down(g, x, h), _c(g, "g", K), _c(g, "b", K)],
                  {"stash_type": DType.FLOAT16}, name="ln")[0]
        g.outputs.append(y)
    _unchanged(half_stats)


def test_the_late_list_moves_it_on_gpu_builds_before_norm_gemm_fusion() -> None:
    """BERT's layer end: FFN-down + residual, LN, the next layer's QKV reading the LN's rows. On a GPU build the
    residual moves into the norm, and the norm (no longer a bare LayerNorm) stays out of the QKV's node."""
    for device, kinds in (("cpu", ["epilogue", "LayerNormalization", "MatMul"]),
                          ("cuda", ["epilogue", "residual_norm", "MatMul"])):
        g, x, h = _graph()
        y = _ln(g, _ffn_down(g, x, h))
        g.outputs += [y, g.add("MatMul", [y, _c(g, "qkv", K, N, seed=8)], name="qkv")[0]]
        epilogue_fusion(g)
        optimize_late(g, PassContext(device=device))
        assert _kinds(g) == kinds, device
    g, x, h = _graph()
    y = _ln(g, x)
    g.outputs.append(g.add("MatMul", [y, _c(g, "qkv", K, N, seed=8)], name="qkv")[0])
    fuse_residual_norm(g)
    assert fuse_norm_gemm(g).changed  # a norm without a residual still fuses with its GEMM


def test_a_residual_norm_node_survives_the_engine_file_and_runs(tmp_path: Path) -> None:
    g = Graph()
    x, h = g.add_input("x", TensorType(F32, (2, 5, K))), g.add_input("h", TensorType(F32, (2, 5, N)))
    g.outputs.append(_ln(g, _ffn_down(g, x, h)))
    feeds = dict(FEEDS[0])
    want = Interpreter(g).run(dict(feeds))
    epilogue_fusion(g)
    fuse_residual_norm(g)
    path = tmp_path / "residual_norm.kiln"
    kiln.build(g).save(path)
    engine = kiln.load(path)
    assert any(isinstance(n, Node) and n.op == "Fused" and n.attrs["kind"] == "residual_norm"
               for n in engine.graph.nodes)
    got = engine.create_context().run(feeds)
    np.testing.assert_allclose(got[g.outputs[0].name], want[g.outputs[0].name], rtol=1e-5, atol=1e-5)


def test_a_sum_read_elsewhere_is_the_nodes_first_output() -> None:
    """Pre-LN (ViT): the sum is the residual stream too (and here a model output); the node writes it."""
    g, x, h = _graph()
    s = _ffn_down(g, x, h)
    g.outputs += [_ln(g, s), g.add("Transpose", [s], {"perm": [0, 2, 1]}, name="stream")[0], s]
    epilogue_fusion(g)
    (result,) = run_checked(g, [fuse_residual_norm], FEEDS)
    assert result.counts == {"after_epilogue_kept": 1}
    (rn,) = [n for n in g.nodes if n.op == "Fused" and n.attrs["kind"] == "residual_norm"]
    stream = rn.outputs[0]  # the sum, by its name (epilogue fusion made a new value of that name)
    assert len(rn.outputs) == 2 and stream.name == s.name.removesuffix(".inner") and stream in g.outputs
    assert stream.producer is rn and any(stream in n.inputs for n in g.nodes if n.op == "Transpose")
