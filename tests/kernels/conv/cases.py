"""Conv cases for `triton.conv`: hand-built graphs (a Conv and its epilogue, fused by the real pass), their feeds
(NCHW or channels-last) and the tiles each runs with. `run` compares the tactic's output with the op table's
reference (the Fused node's reference runs its body) and checks the output's memory layout.

Shared by the interpreter test (CPU, small shapes) and the GPU tier (`test_gpu.py`, `device="cuda"`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node, Value
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.kernels.conv.triton_conv import channels_last
from kiln.passes.epilogue_fusion import epilogue_fusion

D = DType
F32, F16 = D.FLOAT32, D.FLOAT16
CUDA = torch.device("cuda")
TOL = {F32: 1e-4, F16: 1e-2, D.BFLOAT16: 5e-2}
"""Relative and absolute tolerance by the node's least precise dtype (the float16 reference rounds after every
step)."""

ALL = ("128x128x64-w8s3", "128x64x64-w4s4", "64x64x64-w4s4", "32x64x128-w4s4")


@dataclass
class Case:
    node: Node
    feeds: dict[str, torch.Tensor]
    tiles: tuple[str, ...]


class Maker:
    """Builds one graph: inputs with random feeds (NCHW or channels-last), random constants, seeded."""

    def __init__(self, seed: int = 0) -> None:
        self.g = Graph()
        self.feeds: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def rand(self, shape: tuple[int, ...], dt: DType, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=self.gen) * scale).to(dt.torch)

    def input(self, name: str, shape: tuple[int, ...], dt: DType, cl: bool = False) -> Value:
        t = self.rand(shape, dt)
        self.feeds[name] = t.contiguous(memory_format=torch.channels_last) if cl else t
        return self.g.add_input(name, TensorType(dt, shape))

    def const(self, name: str, shape: tuple[int, ...], dt: DType, scale: float = 1.0) -> Value:
        return self.g.add_initializer(name, self.rand(shape, dt, scale))

    def conv(self, dt: DType, x: tuple[int, int, int, int], n: int, kernel: tuple[int, int], *, cl: bool = False,
             stride: tuple[int, int] = (1, 1), pad: tuple[int, int] = (0, 0), dil: tuple[int, int] = (1, 1),
             bias: bool = True, group: int = 1) -> Value:
        """A Conv of input x [B, C, H, W] to n channels in `group` groups; the weight keeps unit-scale outputs."""
        c = x[1] // group
        ins = [self.input("x", x, dt, cl), self.const("w", (n, c, *kernel), dt, (c * kernel[0] * kernel[1]) ** -0.5)]
        if bias:
            ins.append(self.const("b", (n,), dt))
        attrs = {"strides": stride, "pads": (*pad, *pad), "dilations": dil, "group": group}
        return self.g.add("Conv", ins, attrs, name="conv")[0]

    def residual(self, y: Value, dt: DType, cl: bool) -> Value:
        """y + a full-size input (the ResNet skip connection)."""
        shape = tuple(int(d) for d in y.shape)  # type: ignore[union-attr]
        return self.g.add("Add", [y, self.input("res", shape, dt, cl)], name="residual")[0]

    def finish(self, y: Value, tiles: tuple[str, ...]) -> Case:
        self.g.outputs.append(y)
        epilogue_fusion(self.g)
        (node,) = [n for n in self.g.nodes if n.op in ("Fused", "Conv")]
        return Case(node, self.feeds, tiles)


def relu(m: Maker, y: Value) -> Value:
    return m.g.add("Relu", [y], name="relu")[0]


def conv_relu(dt: DType, x: tuple[int, int, int, int], n: int, kernel: tuple[int, int], tiles: tuple[str, ...],
              **kw: Any) -> Case:
    m = Maker(1)
    return m.finish(relu(m, m.conv(dt, x, n, kernel, **kw)), tiles)


def conv_add_relu(dt: DType, x: tuple[int, int, int, int], n: int, kernel: tuple[int, int], tiles: tuple[str, ...],
                  res_cl: bool | None = None, **kw: Any) -> Case:
    """Conv + bias -> + residual -> Relu (the residual channels-last like x unless `res_cl` says)."""
    m = Maker(2)
    y = m.conv(dt, x, n, kernel, **kw)
    y = m.residual(y, dt, kw.get("cl", False) if res_cl is None else res_cl)
    return m.finish(relu(m, y), tiles)


def conv_hardswish(dt: DType, x: tuple[int, int, int, int], n: int, kernel: tuple[int, int], tiles: tuple[str, ...],
                   **kw: Any) -> Case:
    m = Maker(3)
    return m.finish(m.g.add("HardSwish", [m.conv(dt, x, n, kernel, **kw)], name="hswish")[0], tiles)


def bare(dt: DType, x: tuple[int, int, int, int], n: int, kernel: tuple[int, int], tiles: tuple[str, ...],
         **kw: Any) -> Case:
    m = Maker(4)
    return m.finish(m.conv(dt, x, n, kernel, **kw), tiles)


def prelu_per_channel(dt: DType, tiles: tuple[str, ...]) -> Case:
    """Conv -> PRelu with a constant slope per channel [N, 1, 1] (an operand broadcast over pixels)."""
    m = Maker(5)
    y = m.conv(dt, (2, 4, 6, 6), 5, (3, 3), pad=(1, 1))
    return m.finish(m.g.add("PRelu", [y, m.const("slope", (5, 1, 1), dt, 0.2)], name="prelu")[0], tiles)


def relu_cast(tiles: tuple[str, ...]) -> Case:
    """float16 Conv -> Relu -> Cast to float32: the store writes the node's output dtype."""
    m = Maker(6)
    y = relu(m, m.conv(F16, (2, 128, 4, 4), 5, (1, 1), cl=True))
    return m.finish(m.g.add("Cast", [y], {"to": F32}, name="cast")[0], tiles)


CASES: dict[str, Callable[[], Case]] = {
    # batch 3, odd sizes, padding: every tile
    "3x3-pad1-relu-f32-cl-every-tile": lambda: conv_relu(F32, (3, 4, 7, 7), 5, (3, 3), ALL, cl=True, pad=(1, 1)),
    "3x3-pad1-add-relu-f16-cl-every-tile": lambda: conv_add_relu(F16, (3, 5, 7, 7), 5, (3, 3), ALL, cl=True,
                                                                 pad=(1, 1)),
    # ResNet's stem, small: 7x7, stride 2, padding 3, three input channels
    "stem-7x7-s2-p3-relu-f16-cl": lambda: conv_relu(F16, (2, 3, 11, 11), 8, (7, 7), ("64x64x64-w4s4",), cl=True,
                                                    stride=(2, 2), pad=(3, 3)),
    "3x3-pad1-relu-f32-nchw": lambda: conv_relu(F32, (1, 4, 7, 7), 5, (3, 3), ("64x64x64-w4s4",), pad=(1, 1)),
    "1x1-stride2-add-relu-f16": lambda: conv_add_relu(F16, (1, 16, 9, 9), 5, (1, 1), ("128x64x64-w4s4",),
                                                      stride=(2, 2)),
    "1x1-stride2-add-relu-f32-cl": lambda: conv_add_relu(F32, (3, 8, 7, 7), 5, (1, 1), ("32x64x128-w4s4",),
                                                         cl=True, stride=(2, 2)),
    "3x3-dil2-hardswish-f16-cl": lambda: conv_hardswish(F16, (3, 3, 7, 7), 5, (3, 3),
                                                        ("64x64x64-w4s4", "32x64x128-w4s4"), cl=True, pad=(2, 2),
                                                        dil=(2, 2)),
    "3x3-dil2-hardswish-f32": lambda: conv_hardswish(F32, (1, 3, 7, 7), 5, (3, 3), ("128x128x64-w8s3",),
                                                     pad=(1, 1), dil=(2, 2)),
    "3x3-stride2-add-relu-f32-cl-nchw-residual": lambda: conv_add_relu(F32, (3, 6, 7, 7), 5, (3, 3),
                                                                       ("32x64x128-w4s4",), res_cl=False, cl=True,
                                                                       stride=(2, 2), pad=(1, 1)),
    # two K steps per tap (C=70), a 3x1 kernel with per-axis stride and padding, no bias, no steps
    "3x1-rect-c70-bare-f32": lambda: bare(F32, (1, 70, 6, 9), 5, (3, 1), ("128x128x64-w8s3", "64x64x64-w4s4"),
                                          stride=(1, 2), pad=(1, 0), bias=False),
    # C a multiple of BLOCK_K (unmasked channel loads), N over two column tiles
    "3x3-c64-add-relu-f16-cl": lambda: conv_add_relu(F16, (1, 64, 5, 5), 72, (3, 3),
                                                     ("128x64x64-w4s4", "64x64x64-w4s4"), cl=True, pad=(1, 1)),
    "1x1-c128-relu-cast-f16-cl": lambda: relu_cast(("32x64x128-w4s4", "128x128x64-w8s3")),
    "prelu-per-channel-f32": lambda: prelu_per_channel(F32, ("64x64x64-w4s4",)),
}


def constants_to(node: Node, device: str) -> None:
    """Moves the node's constant inputs to `device`, as the engine holds them (prepared weights then stay valid)."""
    for v in node.inputs:
        if v is not None and isinstance(v.data, torch.Tensor):
            v.data = v.data.to(device)


def inputs(node: Node, feeds: dict[str, torch.Tensor], device: str = "cpu") -> list[Any]:
    return [None if v is None else (v.data if v.data is not None else feeds[v.name]).to(device) for v in node.inputs]


def tolerance(node: Node) -> float:
    return max(TOL[v.dtype] for v in [*node.inputs, *node.outputs] if v is not None)


def compare(got: Any, want: torch.Tensor, tol: float, cl: bool) -> str | None:
    """What differs between a kernel output and the reference (None: they agree); `cl`: channels-last expected."""
    if not isinstance(got, torch.Tensor):
        return f"got {type(got).__name__}, expected a tensor"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    if channels_last(got) != cl or not got.is_contiguous(memory_format=torch.channels_last if cl else
                                                         torch.contiguous_format):
        return f"got strides {got.stride()}, expected {'channels-last' if cl else 'NCHW'}"
    try:
        torch.testing.assert_close(got.cpu().double(), want.cpu().double(), rtol=tol, atol=tol)
    except AssertionError as e:
        return str(e)[:1500]
    return None


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    return run(CASES[name](), device)


def run(case: Case, device: str = "cpu", tol: float | None = None, tactic_name: str = "triton.conv") -> \
        dict[str, str | None]:
    """{tile: what differs, or None} for every tile of the case, built for CUDA and run on `device` tensors."""
    tactic = registry.get(tactic_name)
    if not tactic.applicable(case.node, CUDA):
        return {"applicable": f"{tactic_name} refused the node"}
    args = inputs(case.node, case.feeds, device)
    want = OPS[case.node.op].ref(RefCtx(case.node), list(args))[0]
    x = case.feeds["x"]
    out: dict[str, str | None] = {}
    for tile in case.tiles:
        got = tactic.build(case.node, {"tile": tile}, CUDA)(list(args))[0]
        out[tile] = compare(got, want, tolerance(case.node) if tol is None else tol, channels_last(x))
    return out
