"""1x1 conv cases for `triton.thin_conv` (the graphs, feeds and checks of `cases.py`: channels-last 16-bit input,
few input channels). Shared by the interpreter test (CPU, small shapes) and the GPU tier (`test_gpu.py`)."""

from __future__ import annotations

from collections.abc import Callable

from kiln.ir import DType
from kiln.kernels.conv.triton_conv import THIN_TILES
from tests.kernels.conv.cases import F16, Case, Maker, conv_hardswish, conv_relu, run

ALL = tuple(THIN_TILES)


def add(x: tuple[int, int, int, int], n: int, tiles: tuple[str, ...], dt: DType = F16) -> Case:
    """1x1 conv + bias + a channels-last residual (a MobileNetV3 projection, no activation after the add)."""
    m = Maker(5)
    return m.finish(m.residual(m.conv(dt, x, n, (1, 1), cl=True), dt, True), tiles)


CASES: dict[str, Callable[[], Case]] = {
    # 24-channel input (48-byte rows, one K step of 32 or 64 zero-filled past 24), 136 outputs: rows of the
    # output 8-aligned, not 16; every tile
    "24-136-hardswish-every-tile": lambda: conv_hardswish(F16, (2, 24, 7, 10), 136, (1, 1), ALL, cl=True),
    # 16 -> 128 with a channels-last residual; a patch wider than the image
    "16-128-add": lambda: add((3, 16, 7, 8), 128, ALL),
    # 72 -> 160 + ReLU: two K steps on either tile, a last column block of 32 or 96 channels
    "72-160-relu": lambda: conv_relu(F16, (2, 72, 6, 13), 160, (1, 1), ALL, cl=True),
    # narrow outputs: 16 -> 16 + residual, 72 -> 24 + residual (output rows 8-aligned), 40 -> 120 + ReLU
    "16-16-add": lambda: add((2, 16, 9, 11), 16, ALL),
    "72-24-add": lambda: add((2, 72, 8, 9), 24, ALL),
    "40-120-relu": lambda: conv_relu(F16, (1, 40, 10, 7), 120, (1, 1), ALL, cl=True),
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    return run(CASES[name](), device, tactic_name="triton.thin_conv")
