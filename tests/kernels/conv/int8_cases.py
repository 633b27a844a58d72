"""Quantized conv cases for `triton.int8_conv`: a Conv (+ epilogue) quantized by kiln's own Q/DQ placement and
folded into a "quantized" node, fed an int8 activation; `run` compares every tile with the node's reference (its
body: dequantize, then the float conv). Shared by the interpreter test (CPU) and the GPU tier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.ir import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx, run_nodes
from kiln.kernels import registry
from kiln.kernels.conv.triton_conv import INT8_TILES, channels_last
from kiln.precision.lower import lower_precision
from kiln.precision.quantize import fold_quantized, fuse_requantize, quantize_graph
from tests.kernels.conv.cases import CUDA, F32, Maker, relu

ALL = tuple(INT8_TILES)


def quantized(x: tuple[int, int, int, int], n: int, k: int, *, cl: bool = True, act: bool = True,
              half: bool = False, requant: bool = False, dual: bool = False, fp8: bool = False,
              residual: bool = False, mul: float | None = None, **kw: Any) -> tuple[Node, list[Any]]:
    """The folded node of Conv(x) (+ Relu), min-max scales from a sample, and its inputs with an int8 activation.
    `requant`: a 1x1 conv reads its output, so it ends by quantizing for that conv (an int8 output); `dual`: the
    float result is read too (a graph output, as a ResNet block's output is by the next residual add), so the
    layer writes both; `fp8`: float8 E4M3 instead of int8 (per-output-channel weight scales); `residual`: before the
    activation, add an int8 tensor's dequantized values (a ResNet skip connection read as int8: the dequantize
    becomes an epilogue step); `mul`: then multiply by that constant."""
    m = Maker(21)
    y = m.conv(F32, x, n, (k, k), cl=cl, **kw)
    if mul is not None:
        (y,) = m.g.add("Mul", [y, m.g.add_initializer("mul", torch.tensor(mul))], name="mul")
    if residual:
        r = m.input("res", tuple(int(d) for d in y.shape), F32, cl)  # type: ignore[union-attr]
        s = m.g.add_initializer("res.scale", torch.tensor(float(m.feeds["res"].abs().max()) / 127))
        zp = m.g.add_initializer("res.zero_point", torch.tensor(0, dtype=torch.int8))
        (rq,) = m.g.add("QuantizeLinear", [r, s, zp], name="res/quantize")
        (rd,) = m.g.add("DequantizeLinear", [rq, s, zp], name="res/dequantize")
        (y,) = m.g.add("Add", [y, rd], name="residual")
    if act:
        y = relu(m, y)
    if dual:
        m.g.outputs.append(y)
    scales = {"x": float(m.feeds["x"].abs().max()) / 127}
    if requant or dual:
        scales[y.name] = 0.05
        w2 = m.const("w2", (4, n, 1, 1), F32, n ** -0.5)
        y = m.g.add("Conv", [y, w2], {"strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1)}, name="conv2")[0]
    m.g.outputs.append(y)
    from kiln.passes.epilogue_fusion import epilogue_fusion

    epilogue_fusion(m.g)
    # every channel count: the kernel takes any (a model quantized before import may)
    node, args = folded_layer(m.g, scales, {v: m.feeds[v.name] for v in m.g.inputs}, half, requant or dual, fp8)
    if residual:  # the layer reads the int8 tensor itself
        assert node.attrs["body"].nodes[3].op == "DequantizeLinear"
        assert sum(isinstance(a, torch.Tensor) and a.dtype == torch.int8 and a.dim() == 4 for a in args) == 3
    args[0] = args[0].contiguous(memory_format=torch.channels_last) if cl else args[0].contiguous()
    return node, args


def folded_layer(g: Graph, scales: dict[str, float], feeds: dict[Value, torch.Tensor], half: bool,
                 requant: bool, fp8: bool = False) -> tuple[Node, list[Any]]:
    """Q/DQ placed with `scales` (the float parts lowered to float16 with `half`, as a GPU int8 build does), folded
    into one "quantized" layer (two with `requant`, the first then ending in a requantize), and that first layer
    with its inputs computed from `feeds` (an int8 activation first; float8 E4M3 with `fp8`)."""
    quantize_graph(g, scales, fp8=fp8)
    if half:
        lower_precision(g, DType.FLOAT16)
    assert len(fold_quantized(g)) == (2 if requant else 1)
    assert len(fuse_requantize(g)) == (1 if requant else 0)
    node = next(n for n in g.nodes if n.op == "Fused" and n.attrs["kind"] == "quantized")
    env = run_nodes(g.nodes[:g.nodes.index(node)], feeds)  # the quantize (and casts) feeding it
    args = [None if v is None else (v.data if v.data is not None else env[v]) for v in node.inputs]
    assert args[0].dtype == (torch.float8_e4m3fn if fp8 else torch.int8)
    return node, args


def run(node: Node, args: list[Any], tiles: tuple[str, ...] = ALL, device: str = "cpu") -> dict[str, str | None]:
    def layout(got: torch.Tensor) -> str | None:  # the output keeps the input's memory format
        return None if channels_last(got) == channels_last(args[0]) else f"layout: strides {got.stride()}"

    return run_tiles("triton.int8_conv", node, args, tiles, device, layout)


def run_tiles(tactic: str, node: Node, args: list[Any], tiles: tuple[str, ...], device: str,
              layout: Callable[[torch.Tensor], str | None]) -> dict[str, str | None]:
    """{tile: what differs from the folded node's reference, or None} for the int8 `tactic` built for CUDA and run
    on `device` tensors; `layout` checks the output's memory format."""
    t = registry.get(tactic)
    if not t.applicable(node, CUDA):
        return {"applicable": "refused"}
    wants = OPS["Fused"].ref(RefCtx(node), list(args))
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out: dict[str, str | None] = {}
    for tile in tiles:
        gots = [g.cpu() for g in t.build(node, {"tile": tile}, CUDA)(list(moved))]
        problems = [_differs(got, want, layout) for got, want in zip(gots, wants)]
        if len(gots) != len(wants):
            problems.append(f"{len(gots)} outputs, expected {len(wants)}")
        out[tile] = "; ".join(p for p in problems if p) or None
    return out


def _differs(got: torch.Tensor, want: torch.Tensor, layout: Callable[[torch.Tensor], str | None]) -> str | None:
    """What is wrong with one output, or None."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    wrong = layout(got)
    if wrong is not None:
        return wrong
    if not want.is_floating_point():  # requantized: a float sum that differs in its last bits may round the
        # other way at a .5 boundary - one step, rarely; anything more is a bug
        diff = (got.int() - want.int()).abs()
        share = float((diff == 0).float().mean())
        return None if int(diff.max()) <= 1 and share >= 0.99 else f"int8 max diff {int(diff.max())}, {share:.4f} equal"
    tol = 1e-2 if want.dtype == torch.float16 else 1e-4
    try:
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
        return None
    except AssertionError as e:
        return str(e)[:800]


CASES: dict[str, Callable[[], tuple[Node, list[Any]]]] = {
    "3x3-pad1-relu-cl-every-tile": lambda: quantized((2, 16, 7, 7), 24, 3, pad=(1, 1)),
    "1x1-s2-bare-nchw": lambda: quantized((1, 8, 9, 9), 16, 1, cl=False, act=False, stride=(2, 2)),
    "3x3-c70-relu-f16-cl": lambda: quantized((1, 70, 5, 5), 8, 3, half=True, pad=(1, 1)),
    "stem-7x7-s2-c3-cl": lambda: quantized((1, 3, 11, 11), 8, 7, stride=(2, 2), pad=(3, 3)),
    "3x3-relu-requantize-cl": lambda: quantized((2, 16, 7, 7), 24, 3, requant=True, pad=(1, 1)),
    "3x3-relu-requantize-f16-cl": lambda: quantized((2, 16, 7, 7), 24, 3, requant=True, half=True, pad=(1, 1)),
    # the float result and its int8 copy (a ResNet block's output: the residual add reads one, the next conv the other)
    "3x3-relu-dual-f16-cl": lambda: quantized((2, 16, 7, 7), 24, 3, dual=True, half=True, pad=(1, 1)),
    "3x3-relu-dual-nchw": lambda: quantized((1, 16, 6, 5), 24, 3, dual=True, cl=False, pad=(1, 1)),
    # the TMA form: patches of the output, taps as shifted rectangular loads zero-filled at the edges
    "tma-3x3-c32-f16-cl": lambda: quantized((2, 32, 9, 11), 24, 3, half=True, pad=(1, 1)),  # C < BLOCK_K
    "tma-3x3-c80-relu-requantize-cl": lambda: quantized((1, 80, 7, 7), 40, 3, requant=True, pad=(1, 1)),
    "tma-5x5-pad2-dual-f16-nchw": lambda: quantized((2, 16, 10, 6), 70, 5, dual=True, half=True, cl=False,
                                                    pad=(2, 2)),
    "tma-1x1-c64-bare-cl": lambda: quantized((2, 64, 5, 20), 8, 1, act=False),
    # the skip connection read as int8 (dequantized in the epilogue), the block output requantized or dual
    "3x3-int8-residual-relu-f16-cl": lambda: quantized((2, 16, 7, 7), 24, 3, residual=True, half=True, pad=(1, 1)),
    "1x1-int8-residual-requantize-nchw": lambda: quantized((1, 16, 6, 5), 24, 1, residual=True, requant=True,
                                                           cl=False),
    "tma-3x3-int8-residual-dual-f16-cl": lambda: quantized((2, 32, 9, 11), 24, 3, residual=True, dual=True,
                                                           half=True, pad=(1, 1)),
    # a scalar constant in the TMA form's epilogue (read as a one-value operand)
    "tma-3x3-times-constant-cl": lambda: quantized((1, 16, 6, 10), 24, 3, mul=0.75, pad=(1, 1)),
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    node, args = CASES[name]()
    tma = tuple(t for t in ALL if t.startswith("tma"))
    tiles = ALL if name.endswith("every-tile") else tma if name.startswith("tma") else ALL[2:3]
    return run(node, args, tiles, device)
