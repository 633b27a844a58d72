"""Conv cases for `triton.stem_conv` (few input channels; the graphs, feeds and checks of `cases.py`). Shared by
the interpreter test (CPU, small shapes) and the GPU tier (`test_gpu.py`)."""

from __future__ import annotations

from collections.abc import Callable

from kiln.ir import DType
from kiln.kernels.conv.triton_stem import TILES
from tests.kernels.conv.cases import F16, F32, Case, Maker, bare, conv_add_relu, conv_hardswish, conv_relu, run

ALL = tuple(TILES)


def stem_cast(tiles: tuple[str, ...]) -> Case:
    """An RGB float16 stem writing float32 (a Cast in the epilogue): the store takes the node's output dtype."""
    m = Maker(9)
    y = m.g.add("HardSwish", [m.conv(F16, (2, 3, 9, 9), 16, (3, 3), cl=True, stride=(2, 2), pad=(1, 1))])[0]
    return m.finish(m.g.add("Cast", [y], {"to": F32}, name="cast")[0], tiles)


CASES: dict[str, Callable[[], Case]] = {
    # MobileNetV3's stem, small: 3 -> 16, 3x3, stride 2, HardSwish; every tile (16 = one column tile or wrapped)
    "mnv3-3x3-s2-hardswish-f16-cl-every-tile": lambda: conv_hardswish(F16, (3, 3, 9, 11), 16, (3, 3), ALL, cl=True,
                                                                      stride=(2, 2), pad=(1, 1)),
    # ResNet's stem: 7x7, stride 2, padding 3 - 147 taps, five K steps; 24 output channels over 16-wide tiles
    "resnet-7x7-s2-p3-relu-f16-cl": lambda: conv_relu(F16, (2, 3, 13, 12), 24, (7, 7), ALL, cl=True,
                                                      stride=(2, 2), pad=(3, 3)),
    # an NCHW input (read with its own strides), float32 products
    "3x3-relu-f32-nchw": lambda: conv_relu(F32, (2, 3, 8, 8), 32, (3, 3), ("128x32x32-w4",), pad=(1, 1)),
    # one input channel, dilation, no padding, no bias
    "gray-3x3-dil2-bare-f32-cl": lambda: bare(F32, (1, 1, 9, 9), 8, (3, 3), ("128x16x32-w4",), cl=True,
                                              dil=(2, 2), bias=False),
    # 8 channels (the largest taken), a residual add, rectangular kernel and per-axis stride
    "c8-3x1-add-relu-f16-cl": lambda: conv_add_relu(F16, (2, 8, 6, 7), 64, (3, 1), ("128x64x32-w4",), cl=True,
                                                    stride=(1, 2), pad=(1, 0)),
    "cast-f32-out": lambda: stem_cast(("128x16x32-w4",)),
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    return run(CASES[name](), device, tactic_name="triton.stem_conv")


__all__ = ["ALL", "CASES", "DType", "run_case"]
