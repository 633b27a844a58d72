"""channel_scale: a squeeze-and-excitation Mul (activation [N, C, H, W] times a [N or 1, C, 1, 1] scale) whose
product only a 1x1 conv reads becomes one Fused node of kind "scaled" (Mul first in the body, then the conv and
its epilogue) - GPU builds at optimization level 4 only; the graph computes the same values (exactly: the body is
the same nodes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.kernels import registry
from kiln.passes.channel_scale import channel_scale, fuse_channel_scale, unscale
from kiln.passes.epilogue_fusion import epilogue_fusion
from kiln.passes.manager import PassContext, PassResult
from tests.passes.same_function import run_checked

F16 = DType.FLOAT16
CUDA = torch.device("cuda")


def _se(c: int = 24, n: int = 40, hw: tuple[int, int] = (7, 8), *, epilogue: str = "relu", kernel: int = 1,
        scale_shape: tuple[int, ...] | None = None, dtype: DType = F16, extra_reader: bool = False,
        scale_first: bool = False) -> Graph:
    """x [2, c, H, W] * s -> 1x1 conv to n channels + bias, then `epilogue`: "relu", "residual" (+ an input of the
    output's shape) or "" (the bare conv)."""
    g = Graph()
    x = g.add_input("x", TensorType(dtype, (2, c, *hw)))
    s = g.add_input("s", TensorType(dtype, scale_shape or (2, c, 1, 1)))
    m = g.add("Mul", [s, x] if scale_first else [x, s], name="se_scale")[0]
    gen = torch.Generator().manual_seed(0)
    w = g.add_initializer("w", (torch.randn(n, c, kernel, kernel, generator=gen) * c ** -0.5).to(dtype.torch))
    b = g.add_initializer("b", torch.randn(n, generator=gen).to(dtype.torch))
    pad = (kernel // 2,) * 4
    y = g.add("Conv", [m, w, b], {"pads": pad}, name="project")[0]
    if epilogue == "relu":
        y = g.add("Relu", [y], name="relu")[0]
    elif epilogue == "residual":
        y = g.add("Add", [y, g.add_input("r", TensorType(dtype, (2, n, *hw)))], name="residual")[0]
    g.outputs.append(y)
    if extra_reader:
        g.outputs.append(m)
    epilogue_fusion(g)
    return g


def _feeds(g: Graph) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{v.name: rng.standard_normal(v.shape).astype(np.float16) for v in g.inputs}]  # type: ignore[arg-type]


@pytest.mark.parametrize("scale_first", [False, True], ids=["x*s", "s*x"])
@pytest.mark.parametrize("epilogue", ["relu", "residual", ""])
def test_the_scale_joins_the_conv_and_the_graph_computes_the_same(epilogue: str, scale_first: bool) -> None:
    g = _se(epilogue=epilogue, scale_first=scale_first)
    (result,) = run_checked(g, [fuse_channel_scale], _feeds(g), rel=0.0)
    assert result.counts == {"scaled": 1}
    (node,) = g.nodes
    body = node.attrs["body"]
    assert node.attrs["kind"] == "scaled"
    assert [n.op for n in body.nodes] == ["Mul", "Conv", *({"relu": ["Relu"], "residual": ["Add"]}.get(epilogue, []))]
    assert {v.name for v in node.inputs[:2]} == {"x", "s"}
    tactic = registry.get("triton.thin_conv")
    assert tactic.applicable(node, CUDA)
    assert "triton.conv" not in [t.name for t in registry.candidates(node, CUDA)]  # it cannot scale


def test_any_number_of_input_channels_and_a_scale_shared_by_the_batch() -> None:
    g = _se(c=672, n=112, hw=(14, 14), scale_shape=(1, 672, 1, 1))
    assert fuse_channel_scale(g).counts == {"scaled": 1}
    assert registry.get("triton.thin_conv").applicable(g.nodes[0], CUDA)


@pytest.mark.parametrize(("kw", "why"), [
    ({"kernel": 3}, "a 3x3 conv"),
    ({"scale_shape": (2, 24, 7, 8)}, "a full-size operand: not a channel scale"),
    ({"hw": (4, 4)}, "an image smaller than 7 x 7"),
    ({"c": 20}, "40-byte rows of channels"),
    ({"dtype": DType.FLOAT32}, "float32"),
    ({"extra_reader": True}, "the product is read elsewhere too"),
], ids=["3x3", "full-operand", "small-image", "unaligned-rows", "float32", "two-readers"])
def test_leaves_what_the_thin_conv_cannot_take(kw: dict[str, Any], why: str) -> None:
    g = _se(**kw)
    assert not fuse_channel_scale(g).changed, why
    assert "scaled" not in [n.attrs.get("kind") for n in g.nodes]


@pytest.mark.parametrize(("device", "level", "capability", "fused"), [
    ("cuda", 4, (9, 0), True), ("cuda", 3, (9, 0), False), ("cuda", 4, (8, 0), False), ("cuda", 4, None, False),
    ("cpu", 4, None, False)])
def test_only_hopper_builds_at_level_four(device: str, level: int, capability: tuple[int, int] | None,
                                          fused: bool) -> None:
    g = _se()
    ctx = PassContext(device=device, opt_level=level, capability=capability)
    assert channel_scale(ctx)(g).changed is fused


@pytest.mark.parametrize("epilogue", ["relu", "residual", ""])
def test_unscale_gives_back_the_mul_and_the_conv(epilogue: str) -> None:
    """The builder's net: a scaled node split back computes the same, as a Mul and the conv (bare, or anchoring
    its epilogue) that the other tactics take."""
    g = _se(epilogue=epilogue)
    before = [(n.op, n.attrs.get("kind")) for n in g.nodes]
    assert fuse_channel_scale(g).changed and len(g.nodes) == 1
    run_checked(g, [lambda graph: (unscale(graph, graph.nodes[0]), PassResult(True, {}))[1]], _feeds(g), rel=0.0)
    assert [(n.op, n.attrs.get("kind")) for n in g.nodes] == before and before[0] == ("Mul", None)
    conv = g.nodes[1]
    assert "triton.thin_conv" in [t.name for t in registry.candidates(conv, CUDA)]
    assert any(t.name == "cuda.conv" for t in registry.candidates(conv, CUDA))


def test_a_scaled_node_no_gpu_kernel_takes_is_split_back_at_once() -> None:
    """With `PassContext.runnable` (the builder asks the kernel registry), a node the thin conv refuses is not
    kept: the graph is as before the pass, and the pass says so."""
    g = _se(epilogue="residual")
    ctx = PassContext(device="cuda", opt_level=4, capability=(9, 0), runnable=lambda node: False)
    (result,) = run_checked(g, [channel_scale(ctx)], _feeds(g), rel=0.0)
    assert not result.changed and result.counts == {"undone": 1}
    assert [(n.op, n.attrs.get("kind")) for n in g.nodes] == [("Mul", None), ("Fused", "epilogue")]
    g = _se(epilogue="residual")
    ctx = PassContext(device="cuda", opt_level=4, capability=(9, 0),
                      runnable=lambda node: any(t.name != "reference" for t in registry.candidates(node, CUDA)))
    assert channel_scale(ctx)(g).counts == {"scaled": 1}  # the thin conv takes it
