"""Quantized GEMM cases for `triton.int8_gemm`: a MatMul/Gemm (+ epilogue) quantized by kiln's own Q/DQ placement
(min-max scales from the sample) and folded into a "quantized" node, fed its int8 activation; `run` compares every
tile with the node's reference (its body: dequantize, then the float layer). Shared by the interpreter test (CPU)
and the GPU tier (`test_gpu.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.ir.graph import Node, Value
from kiln.ir.ops.base import run_nodes
from kiln.kernels.gemm.triton_gemm import INT8_TILES
from kiln.passes.epilogue_fusion import epilogue_fusion
from tests.kernels.conv.int8_cases import folded_layer, run_tiles
from tests.kernels.conv.int8_cases import quantized as quantized_conv
from tests.kernels.gemm.cases import F32, Maker

ALL = tuple(INT8_TILES)


def quantized(lead: tuple[int, ...], k: int, n: int, *, act: str | None = "Relu", residual: bool = False,
              gemm: bool = False, half: bool = False, requant: bool = False, fp8: bool = False,
              seed: int = 31) -> tuple[Node, list[Any]]:
    """The folded node of x @ W + b (+ activation, + residual) and its inputs, x quantized to int8. `gemm`: a Gemm
    with transB and the bias as C (x 2-D); `requant`: a second MatMul reads the output, so the layer ends by
    quantizing for it (an int8 output); `half`: the float parts lowered to float16 (a GPU int8 build's); `fp8`:
    float8 E4M3 instead of int8 (per-tensor weight scale)."""
    m = Maker(seed)
    x = m.input("x", (*lead, k), F32)
    if gemm:
        y = m.g.add("Gemm", [x, m.weight(k, n, F32, trans=True), m.const("b", (n,), F32)], {"transB": 1},
                    name="fc")[0]
    else:
        y = m.g.add("MatMul", [x, m.weight(k, n, F32)], name="mm")[0]
        y = m.g.add("Add", [y, m.const("b", (n,), F32)], name="bias")[0]
    if act == "Gelu":
        y = m.g.add("Gelu", [y], name="gelu")[0]
    elif act is not None:
        y = m.g.add(act, [y], name="act")[0]
    if residual:
        y = m.g.add("Add", [y, m.input("res", (*lead, n), F32)], name="residual")[0]
    if requant:
        w2: Value = m.g.add_initializer("w2", torch.randn(n, 8, generator=m.gen) * n ** -0.5)
        y = m.g.add("MatMul", [y, w2], name="mm2")[0]
    m.g.outputs.append(y)
    epilogue_fusion(m.g)
    env = run_nodes(m.g.nodes, {v: m.feeds[v.name] for v in m.g.inputs})
    scales = {v.name: max(float(t.abs().max()), 1e-6) / 127 for v, t in env.items()
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    scales.update({name: float(t.abs().max()) / 127 for name, t in m.feeds.items()})
    return folded_layer(m.g, scales, {v: m.feeds[v.name] for v in m.g.inputs}, half, requant, fp8)


def run(node: Node, args: list[Any], tiles: tuple[str, ...] = ALL, device: str = "cpu") -> dict[str, str | None]:
    def layout(got: torch.Tensor) -> str | None:  # a 1x1 conv read as a GEMM writes channels-last
        if got.dim() == 4 and not got.is_contiguous(memory_format=torch.channels_last):
            return f"a conv's output is written channels-last; strides {got.stride()}"
        return None

    return run_tiles("triton.int8_gemm", node, args, tiles, device, layout)


CASES: dict[str, Callable[[], tuple[Node, list[Any]]]] = {
    "bias-relu-every-tile": lambda: quantized((2, 65), 256, 96),
    "bias-gelu-residual-f16": lambda: quantized((130,), 256, 96, act="Gelu", residual=True, half=True),
    "gemm-transb-bias-ragged-k": lambda: quantized((33,), 200, 40, gemm=True, act=None),
    "bias-relu-requantize": lambda: quantized((130,), 128, 64, requant=True),
    "bias-gelu-requantize-f16": lambda: quantized((130,), 128, 64, act="Gelu", requant=True, half=True),
    # 1x1 stride-1 convs read as GEMMs (`Spec.conv`): channels-last and NCHW inputs, a requantizing one in float16
    "conv1x1-relu-cl": lambda: _conv1x1((2, 32, 5, 7), 24),
    "conv1x1-bare-nchw": lambda: _conv1x1((1, 48, 3, 3), 16, cl=False, act=False),
    "conv1x1-relu-requantize-f16": lambda: _conv1x1((2, 32, 5, 5), 24, requant=True, half=True),
    "conv1x1-relu-dual-f16": lambda: _conv1x1((2, 32, 5, 5), 24, dual=True, half=True),
    # a bottleneck's last conv: the skip connection read as int8, dequantized in the epilogue, int8 out
    "conv1x1-int8-residual-requantize-f16": lambda: _conv1x1((2, 32, 5, 5), 24, residual=True, requant=True,
                                                             half=True),
}


def _conv1x1(x: tuple[int, int, int, int], n: int, **kw: Any) -> tuple[Node, list[Any]]:
    return quantized_conv(x, n, 1, **kw)


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    node, args = CASES[name]()
    tiles = ALL if name.endswith("every-tile") else ALL[1:2]
    return run(node, args, tiles, device)
