"""Cases for the GEMM and conv tiles under evaluation (`triton.gemm_next`, `triton.int8_gemm_next`,
`triton.int8_conv_next`: epilogues on column slices, persistent programs): float and int8 GEMMs with more output
tiles than programs (3 programs off the GPU, so persistent programs loop over several tiles), int8 convs wider than
a tile, and epilogues that read every operand kind - residuals, per-channel biases, requantizing second outputs.
Shared by the interpreter test and the GPU tier."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from kiln.ir import DType
from kiln.ir.graph import Node
from kiln.kernels.conv.triton_conv import INT8_NEXT_TILES as CONV_NEXT_TILES
from kiln.kernels.gemm.triton_gemm import INT8_NEXT_TILES, INT8_TILES, NEXT_TILES, TILES, Tile
from tests.kernels.conv.int8_cases import quantized as quantized_conv
from tests.kernels.conv.int8_cases import run_tiles
from tests.kernels.gemm import cases as f
from tests.kernels.gemm import int8_cases as q


def _sliced(tiles: dict[str, Tile]) -> tuple[str, ...]:
    return tuple(name for name, t in tiles.items() if t.persistent or t.subtile > 1)


FLOAT = _sliced(TILES) + tuple(NEXT_TILES)
"""The sliced and persistent float tiles: those measured and moved into `TILES`, then those still opt-in."""
INT8 = _sliced(INT8_TILES) + tuple(INT8_NEXT_TILES)


def run_float(case: f.Case, device: str) -> dict[str, str | None]:
    """`f.run` over the case's tiles, each through its tactic (`triton.gemm` or the opt-in `triton.gemm_next`)."""
    out = f.run(dataclasses.replace(case, tiles=tuple(t for t in case.tiles if t in TILES)), device)
    out.update(f.run(dataclasses.replace(case, tiles=tuple(t for t in case.tiles if t in NEXT_TILES)), device,
                     tactic_name="triton.gemm_next"))
    return out


def _float(make: Callable[[], f.Case]) -> Callable[[str], dict[str, str | None]]:
    return lambda device: run_float(make(), device)


def _int8(make: Callable[[], tuple[Node, list[Any]]], tactic: str = "triton.int8_gemm_next",
          tiles: tuple[str, ...] = INT8) -> Callable[[str], dict[str, str | None]]:
    def run(device: str) -> dict[str, str | None]:
        node, args = make()
        if tactic != "triton.int8_gemm_next":
            return run_tiles(tactic, node, args, tiles, device, lambda got: None)
        out = run_tiles("triton.int8_gemm", node, args, tuple(t for t in tiles if t in INT8_TILES), device,
                        lambda got: None)
        out.update(run_tiles(tactic, node, args, tuple(t for t in tiles if t in INT8_NEXT_TILES), device,
                             lambda got: None))
        return out
    return run


def _conv(make: Callable[[], tuple[Node, list[Any]]]) -> Callable[[str], dict[str, str | None]]:
    return _int8(make, "triton.int8_conv_next", tuple(CONV_NEXT_TILES))


CASES: dict[str, Callable[[str], dict[str, str | None]]] = {
    # M=260 (2 x 130 rows), N=600: 3 x 5 tiles of 128 x 128, 3 x 3 of 128 x 256 (ragged both ways)
    "bias-gelu-residual-f16": _float(lambda: f.bias_gelu_residual(DType.FLOAT16, "none", FLOAT, lead=(2, 130),
                                                                  k=96, n=600)),
    "row-and-batch-operands-f32": _float(lambda: f.row_and_batch_operands(DType.FLOAT32, FLOAT)),
    "bare-f32-ragged-k": _float(lambda: f.bare(DType.FLOAT32, (300,), 100, 520, FLOAT)),
    # K=100 in float16: rows TMA cannot read (200 bytes), so the pointer tile
    "local-constants-f16": _float(lambda: f.local_constants(DType.FLOAT16, ("p-128x128x64-w4s4-e2",))),
    # int8: M=400, N=600: 4 x 5 tiles of 128 x 128, 4 x 3 of 128 x 256
    "int8-bias-gelu-residual-f16": _int8(lambda: q.quantized((400,), 256, 600, act="Gelu", residual=True, half=True)),
    "int8-bias-relu-requantize": _int8(lambda: q.quantized((400,), 128, 600, requant=True)),
    # a 1x1 conv on 2 x 16 x 16 pixels (M=512), N=520, writing its float and int8 outputs
    "int8-conv1x1-relu-dual-f16": _int8(lambda: quantized_conv((2, 32, 16, 16), 520, 1, dual=True, half=True)),
    # int8 convs: 260 / 300 output channels (a 128- and a 256-wide tile and a ragged one), residuals read as int8
    "conv-3x3-int8-residual-dual-f16": _conv(lambda: quantized_conv((2, 32, 9, 11), 260, 3, residual=True,
                                                                    dual=True, half=True, pad=(1, 1))),
    "conv-1x1-int8-residual-requantize": _conv(lambda: quantized_conv((2, 64, 5, 20), 300, 1, residual=True,
                                                                      requant=True)),
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    return CASES[name](device)
