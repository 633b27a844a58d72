"""Depthwise conv cases for `triton.depthwise` (the graphs, feeds and checks of `cases.py`, groups = channels).
Shared by the interpreter test (CPU, small shapes) and the GPU tier (`test_gpu.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.ir import DType
from kiln.kernels.conv.triton_depthwise import TILES
from tests.kernels.conv.cases import F16, F32, Case, Maker, relu, run

ALL = tuple(TILES)


def dw(dt: DType, x: tuple[int, int, int, int], kernel: tuple[int, int], tiles: tuple[str, ...], act: str = "Relu",
       **kw: Any) -> Case:
    """A depthwise Conv (+ bias) followed by `act` ("" for none) on input x [B, C, H, W]."""
    m = Maker(7)
    y = m.conv(dt, x, x[1], kernel, group=x[1], **kw)
    if act == "Relu":
        y = relu(m, y)
    elif act:
        y = m.g.add(act, [y], name="act")[0]
    return m.finish(y, tiles)


def dw_scaled(dt: DType, tiles: tuple[str, ...]) -> Case:
    """Depthwise conv -> Mul by a per-channel [C, 1, 1] constant -> HardSwish: a broadcast operand in the epilogue."""
    m = Maker(8)
    y = m.conv(dt, (2, 24, 9, 9), 24, (5, 5), group=24, cl=True, pad=(2, 2))
    y = m.g.add("Mul", [y, m.const("scale", (24, 1, 1), dt, 0.5)], name="scale")[0]
    return m.finish(m.g.add("HardSwish", [y], name="hswish")[0], tiles)


CASES: dict[str, Callable[[], Case]] = {
    "3x3-pad1-relu-f16-cl-every-tile": lambda: dw(F16, (3, 20, 7, 7), (3, 3), ALL, cl=True, pad=(1, 1)),
    "3x3-s2-pad1-hardswish-f16-cl": lambda: dw(F16, (2, 16, 11, 11), (3, 3), ("16x64-w2", "64x64-w4", "flat64-w2"),
                                               act="HardSwish", cl=True, stride=(2, 2), pad=(1, 1)),
    "5x5-pad2-relu-f32-cl": lambda: dw(F32, (2, 72, 8, 8), (5, 5), ALL, cl=True, pad=(2, 2)),
    "3x3-dil2-bare-f32-cl": lambda: dw(F32, (1, 5, 9, 9), (3, 3), ("64x64-w4", "flat64-w2"), act="", cl=True,
                                       pad=(2, 2), dil=(2, 2), bias=False),
    "3x1-s12-f16-cl": lambda: dw(F16, (2, 6, 7, 9), (3, 1), ("32x32-w2", "flat256-w4"), cl=True,
                                 stride=(1, 2), pad=(1, 0)),
    "scale-hardswish-5x5-f16-cl": lambda: dw_scaled(F16, ("64x64-w4", "flat512-w4")),
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    return run(CASES[name](), device, tactic_name="triton.depthwise")
