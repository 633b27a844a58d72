"""MaxPool cases for `triton.maxpool` (channels-last inputs, window shapes of CNN stems), run against the op
table's reference. Shared by the interpreter test (CPU, small shapes) and the GPU test (`device="cuda"`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.kernels.pool.triton_pool import TILES

CUDA = torch.device("cuda")
ALL = tuple(TILES)


def maxpool(x: tuple[int, int, int, int], dt: DType, **attrs: Any) -> tuple[Node, torch.Tensor]:
    g = Graph()
    v = g.add_input("x", TensorType(dt, x))
    g.outputs.extend(g.add("MaxPool", [v], attrs, name="pool", outputs=1))
    gen = torch.Generator().manual_seed(0)
    if dt in (DType.INT8, DType.UINT8):
        lo, hi = (-128, 128) if dt is DType.INT8 else (0, 256)
        t = torch.randint(lo, hi, x, generator=gen).to(dt.torch).contiguous(memory_format=torch.channels_last)
    else:
        t = torch.randn(x, generator=gen).to(dt.torch).contiguous(memory_format=torch.channels_last)
    return g.nodes[0], t


def run(node: Node, x: torch.Tensor, tiles: tuple[str, ...] = ALL, device: str = "cpu") -> dict[str, str | None]:
    """{tile: what differs from the reference, or None}."""
    tactic = registry.get("triton.maxpool")
    if not tactic.applicable(node, CUDA):
        return {"applicable": "refused"}
    x = x.to(device)
    want = OPS["MaxPool"].ref(RefCtx(node), [x.cpu()])[0]
    out: dict[str, str | None] = {}
    for tile in tiles:
        got = tactic.build(node, {"tile": tile}, CUDA)([x])[0]
        if not got.is_contiguous(memory_format=torch.channels_last):
            out[tile] = f"not channels-last: strides {got.stride()}"
        elif got.shape != want.shape or not torch.equal(got.cpu(), want):  # a max is exact
            out[tile] = f"differs: {got.shape} vs {want.shape}"
        else:
            out[tile] = None
    return out


F16, F32 = DType.FLOAT16, DType.FLOAT32
CASES: dict[str, Callable[[], tuple[Node, torch.Tensor]]] = {
    "resnet-stem-3x3-s2-p1-f16": lambda: maxpool((2, 20, 13, 13), F16, kernel_shape=[3, 3], strides=[2, 2],
                                                 pads=[1, 1, 1, 1]),
    "2x2-s2-f32": lambda: maxpool((1, 70, 8, 9), F32, kernel_shape=[2, 2], strides=[2, 2]),
    "3x3-s1-dil2-p2-f16": lambda: maxpool((1, 8, 9, 9), F16, kernel_shape=[3, 3], dilations=[2, 2],
                                          pads=[2, 2, 2, 2]),
    # quantized activations (precision.quantize.hoist_quantize): padding must never win over -128 / 0
    "resnet-stem-int8": lambda: maxpool((2, 20, 13, 13), DType.INT8, kernel_shape=[3, 3], strides=[2, 2],
                                        pads=[1, 1, 1, 1]),
    "3x3-p1-uint8": lambda: maxpool((1, 24, 6, 6), DType.UINT8, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    node, x = CASES[name]()
    return run(node, x, ALL, device)
