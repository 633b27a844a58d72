"""RotaryEmbedding cases for `triton.rotary` ([B, S, H*D] and [B, H, S, D] inputs, per-sequence and shared tables,
head sizes that are no power of two), against the op table's reference computed in float64. Shared by the
interpreter test (CPU, small shapes) and the GPU test (`device="cuda"`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.kernels.attention.triton_rotary import TILES

CUDA = torch.device("cuda")
ALL = tuple(TILES)
TOLERANCE = {DType.FLOAT16: 1e-3, DType.BFLOAT16: 8e-3, DType.FLOAT32: 2e-6}
"""Relative to the largest |y|: the output's own rounding (computed in float32, rounded once)."""


def rotary(x: tuple[int, ...], dt: DType, heads: int, table_batch: int, rotated: int = 0,
           interleaved: bool = False, positions: int = 0) -> tuple[Node, list[torch.Tensor]]:
    """A RotaryEmbedding node on X of shape `x` (3-D: num_heads=heads) and its inputs: angles of a real RoPE
    (position times inverse frequencies), tables [table_batch, S, R/2] for R = `rotated` dims (0: the head, D) -
    or, with `positions` P, caches [P, R/2] and position ids [table_batch, S] drawn in [0, P)."""
    s, hd = (x[1], x[2] // heads) if len(x) == 3 else (x[2], x[3])
    d = rotated or hd
    g = Graph()
    v = g.add_input("x", TensorType(dt, x))
    table = (positions, d // 2) if positions else (table_batch, s, d // 2)
    c = g.add_input("cos", TensorType(dt, table))
    n = g.add_input("sin", TensorType(dt, table))
    ids = [g.add_input("pos", TensorType(DType.INT64, (table_batch, s)))] if positions else []
    attrs: dict[str, int] = {"num_heads": heads} if len(x) == 3 else {}
    if rotated:
        attrs["rotary_embedding_dim"] = rotated
    if interleaved:
        attrs["interleaved"] = 1
    g.outputs.extend(g.add("RotaryEmbedding", [v, c, n, *ids], attrs, name="rope", outputs=1))
    gen = torch.Generator().manual_seed(0)
    inv = 1.0 / 10000 ** (torch.arange(0, d // 2, dtype=torch.float64) / (d // 2))
    if positions:
        angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv
        pos = [torch.randint(0, positions, (table_batch, s), generator=gen)]
    else:
        at = torch.arange(s, dtype=torch.float64)[None, :, None] + torch.arange(table_batch)[:, None, None] * 3
        angles, pos = at * inv, []
    return g.nodes[0], [torch.randn(x, generator=gen).to(dt.torch), angles.cos().to(dt.torch),
                        angles.sin().to(dt.torch), *pos]


def run(node: Node, xs: list[torch.Tensor], tiles: tuple[str, ...] = ALL, device: str = "cpu") -> \
        dict[str, str | None]:
    """{tile: what differs from the reference, or None}."""
    tactic = registry.get("triton.rotary")
    if not tactic.applicable(node, CUDA):
        return {"applicable": "refused"}
    want = OPS["RotaryEmbedding"].ref(RefCtx(node), [x.double() if x.is_floating_point() else x for x in xs])[0]
    dt = node.inputs[0].dtype  # type: ignore[union-attr]
    scale = float(want.abs().max()) or 1.0
    out: dict[str, str | None] = {}
    for tile in tiles:
        got = tactic.build(node, {"tile": tile}, CUDA)([x.to(device) for x in xs])[0]
        if got.shape != want.shape or got.dtype != xs[0].dtype:
            out[tile] = f"shape/dtype {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {xs[0].dtype}"
            continue
        err = float((got.cpu().double() - want).abs().max()) / scale
        out[tile] = None if err <= TOLERANCE[dt] else f"max error {err:.3g} of the largest |y| (> {TOLERANCE[dt]})"
    return out


F16, F32 = DType.FLOAT16, DType.FLOAT32
CASES: dict[str, Callable[[], tuple[Node, list[torch.Tensor]]]] = {
    "packed-shared-table-f32": lambda: rotary((2, 5, 4 * 16), F32, 4, 1),  # [B, S, H*D], one table for all
    "packed-per-sequence-f16": lambda: rotary((3, 7, 2 * 12), F16, 2, 3),  # D = 12: half 6, no power of two
    "heads-first-f32": lambda: rotary((2, 3, 6, 8), F32, 3, 2),  # [B, H, S, D]
    "heads-first-odd-rows-f16": lambda: rotary((1, 5, 9, 32), F16, 5, 1),  # 45 rows: ragged last block
    # GPT-NeoX / Phi: the first R dims rotated, the rest copied (8 of 32; 10 of 24: 14 copied, no power of two)
    "partial-packed-f16": lambda: rotary((2, 5, 4 * 32), F16, 4, 1, rotated=8),
    "partial-heads-first-f32": lambda: rotary((2, 3, 4, 24), F32, 3, 2, rotated=10),
    # GPT-J: (even, odd) pairs rotated, the whole head or its first R dims
    "interleaved-packed-f32": lambda: rotary((2, 4, 2 * 16), F32, 2, 1, interleaved=True),
    "interleaved-partial-f16": lambda: rotary((1, 3, 6, 20), F16, 3, 1, rotated=12, interleaved=True),
    # onnxruntime's form: caches [P, R/2] read at position ids, per sequence or shared
    "positions-packed-f32": lambda: rotary((2, 5, 2 * 8), F32, 2, 2, positions=11),
    "positions-shared-heads-first-partial-f16": lambda: rotary((3, 2, 4, 16), F16, 2, 1, rotated=8, positions=7),
}
OUT_OF_RANGE = "positions-out-of-range"
CASES[OUT_OF_RANGE] = lambda: rotary((1, 4, 2 * 8), F32, 2, 1, positions=6)  # run by `run_out_of_range`


def run_out_of_range(device: str = "cpu") -> dict[str, str | None]:
    """A position id past the caches: the kernel reads row 0 and its DeferredCheck carries the error."""
    node, xs = CASES[OUT_OF_RANGE]()
    xs[3][0, 2] = 6
    kernel = registry.get("triton.rotary").build(node, {"tile": ALL[0]}, CUDA)
    kernel([x.to(device) for x in xs])
    message = kernel.checks[0].raised()  # type: ignore[attr-defined]
    return {"check": None if message and "node 'rope'" in message and "out of" in message else f"got {message!r}"}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    if name == OUT_OF_RANGE:
        return run_out_of_range(device)
    node, xs = CASES[name]()
    return run(node, xs, ALL, device)
