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


def scaled(x: tuple[int, int, int, int], n: int, tiles: tuple[str, ...], *, act: str = "", residual: bool = False,
           per_image: bool = True, scale_first: bool = False, dt: DType = F16) -> Case:
    """A squeeze-and-excitation scale (Mul by s [N or 1, C, 1, 1]) then a 1x1 conv + bias (+ `act`, + a
    residual), fused by `kiln.passes.channel_scale` into one "scaled" node."""
    from kiln.passes.channel_scale import fuse_channel_scale
    from kiln.passes.epilogue_fusion import epilogue_fusion

    m = Maker(6)
    c = x[1]
    scale = m.input("s", (x[0] if per_image else 1, c, 1, 1), dt)
    act_in = m.input("x", x, dt, cl=True)
    y = m.g.add("Mul", [scale, act_in] if scale_first else [act_in, scale], name="se_scale")[0]
    w, b = m.const("w", (n, c, 1, 1), dt, c ** -0.5), m.const("b", (n,), dt)
    y = m.g.add("Conv", [y, w, b], {"strides": (1, 1), "pads": (0, 0, 0, 0), "group": 1}, name="conv")[0]
    if act:
        y = m.g.add(act, [y], name="act")[0]
    if residual:
        y = m.residual(y, dt, True)
    m.g.outputs.append(y)
    epilogue_fusion(m.g)
    assert fuse_channel_scale(m.g).changed
    (node,) = [nd for nd in m.g.nodes if nd.op == "Fused"]
    assert node.attrs["kind"] == "scaled"
    return Case(node, m.feeds, tiles)


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
    # "scaled" nodes: an SE block's scale applied to each loaded input tile; 72 -> 40 + residual (a MobileNetV3
    # projection), 136 input channels (past THIN_MAX_C: three K steps of 64) with a scale shared by the batch
    "scaled-72-40-add": lambda: scaled((2, 72, 7, 9), 40, ALL, residual=True),
    "scaled-136-24-relu-shared": lambda: scaled((2, 136, 8, 7), 24, ("tma-128x32x64-w4s4", "tma-128x64x32-w4s4"),
                                                act="Relu", per_image=False),
    "scaled-16-64-bare-scale-first": lambda: scaled((3, 16, 7, 7), 64, ("tma-128x16x32-w4s4", "tma-128x64x32-w4s4"),
                                                    scale_first=True),
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    return run(CASES[name](), device, tactic_name="triton.thin_conv")
