"""GlobalAveragePool cases for `triton.global_avgpool` (NCHW and channels-last inputs, squeeze-and-excitation and
classifier-head shapes), against the op table's reference computed in float64. Shared by the interpreter test (CPU,
small shapes) and the GPU test (`device="cuda"`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.kernels.pool.triton_global_pool import TILES

CUDA = torch.device("cuda")
ALL = tuple(TILES)
TOLERANCE = {DType.FLOAT16: 2e-3, DType.BFLOAT16: 1e-2, DType.FLOAT32: 1e-5}
"""Relative to the largest |mean|: the output's own rounding, plus float32 summation order."""


def gap(x: tuple[int, int, int, int], dt: DType, channels_last: bool, offset: float = 0.0) -> \
        tuple[Node, torch.Tensor]:
    g = Graph()
    v = g.add_input("x", TensorType(dt, x))
    g.outputs.extend(g.add("GlobalAveragePool", [v], {}, name="pool", outputs=1))
    t = torch.randn(x, generator=torch.Generator().manual_seed(0)) + offset
    t = t.to(dt.torch)
    return g.nodes[0], t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def run(node: Node, x: torch.Tensor, tiles: tuple[str, ...] = ALL, device: str = "cpu") -> dict[str, str | None]:
    """{tile: what differs from the reference, or None}."""
    tactic = registry.get("triton.global_avgpool")
    if not tactic.applicable(node, CUDA):
        return {"applicable": "refused"}
    want = OPS["GlobalAveragePool"].ref(RefCtx(node), [x.double()])[0]
    dt = node.inputs[0].dtype  # type: ignore[union-attr]
    scale = float(want.abs().max()) or 1.0
    out: dict[str, str | None] = {}
    for tile in tiles:
        got = tactic.build(node, {"tile": tile}, CUDA)([x.to(device)])[0]
        if got.shape != want.shape or got.dtype != x.dtype:
            out[tile] = f"shape/dtype {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {x.dtype}"
            continue
        err = float((got.cpu().double() - want).abs().max()) / scale
        out[tile] = None if err <= TOLERANCE[dt] else f"max error {err:.3g} of the largest mean (> {TOLERANCE[dt]})"
    return out


F16, F32 = DType.FLOAT16, DType.FLOAT32
CASES: dict[str, Callable[[], tuple[Node, torch.Tensor]]] = {
    # an SE block: many channels, a ragged spatial size (7 x 7 = 49, not a multiple of any BLOCK_S)
    "se-7x7-channels-last-f16": lambda: gap((2, 72, 7, 7), F16, True),
    "se-28x28-nchw-f16": lambda: gap((1, 40, 28, 28), F16, False, offset=3.0),  # a mean far from 0
    "head-3x5-nchw-f32": lambda: gap((3, 130, 3, 5), F32, False),
    "one-pixel-channels-last-f32": lambda: gap((2, 17, 1, 1), F32, True),
    "se-120-channels-last-f32": lambda: gap((3, 120, 5, 6), F32, True),  # rows of 120: a multiple of 8, not 16
    # a crop of a larger tensor (a view: rows are not W apart), so the kernel's (h, w) split of the position shows
    "cropped-view-f32": lambda: _cropped(),
}


def _cropped() -> tuple[Node, torch.Tensor]:
    node, _ = gap((2, 12, 7, 5), F32, False)
    base = torch.randn((2, 12, 9, 9), generator=torch.Generator().manual_seed(1))
    return node, base[:, :, 1:8, 2:7]


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    node, x = CASES[name]()
    return run(node, x, ALL, device)
