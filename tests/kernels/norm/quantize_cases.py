"""`triton.norm_quantize` cases: a LayerNormalization / RMSNormalization whose result a per-tensor QuantizeLinear
reads, fused by `fuse_output_quantize` into one "quantizing" node, judged against that node's reference (the body:
the norm, then the quantize) as the tuner judges a candidate (`tests.kernels.quantizing.run`). Shared by the
interpreter test (CPU; int8/uint8 only: the interpreter's float8 conversion is wrong) and the GPU tier (float8
too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from tests.kernels.quantizing import quantized_output, run

SMALL = {"tile": 256, "per_thread": 8, "max_row": 512}
"""Rows longer than 512 elements are streamed (the looped kernel)."""


def norm_quantize(rows: int, n: int, dt: torch.dtype, out: DType, *, rms: bool = False, keep_y: bool = True,
                  zero: int = 0, seed: int = 5) -> tuple[Node, list[Any]]:
    """The fused node of norm(x) -> QuantizeLinear(scale, zero) (the norm's result also a graph output when
    `keep_y`) and its inputs; the scale puts the largest value near the type's top, and a few values past it
    (saturation)."""
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    x = g.add_input("x", TensorType(DType.from_torch(dt), (rows, n)))
    w = g.add_initializer("w", (torch.randn(n, generator=gen) * 0.5 + 1.0).to(dt))
    ins = [x, w]
    if not rms:
        ins.append(g.add_initializer("b", (torch.randn(n, generator=gen) * 0.2).to(dt)))
    (y,) = g.add("RMSNormalization" if rms else "LayerNormalization", ins, {"axis": -1, "epsilon": 1e-5},
                 name="norm", outputs=1)
    node = quantized_output(g, y, dt, out, 3.0, zero=zero, keep_y=keep_y)  # |y| up to ~4: a few saturate
    data = torch.randn(rows, n, generator=gen) * 2.0 + 0.3
    return node, [data.to(dt) if v is x else v.data for v in node.inputs]  # type: ignore[union-attr]


CASES: dict[str, Callable[[], tuple[Node, list[Any]]]] = {
    "ln-f16-int8-keep-y": lambda: norm_quantize(37, 768, torch.float16, DType.INT8),
    "ln-f32-int8-only-q": lambda: norm_quantize(9, 96, torch.float32, DType.INT8, keep_y=False),
    "ln-f16-uint8-zero128-looped": lambda: norm_quantize(5, 1000, torch.float16, DType.UINT8, zero=128),
    "rms-f32-int8-keep-y": lambda: norm_quantize(6, 64, torch.float32, DType.INT8, rms=True),
}
FP8_CASES: dict[str, Callable[[], tuple[Node, list[Any]]]] = {
    "ln-f16-fp8-keep-y": lambda: norm_quantize(4096, 768, torch.float16, DType.FLOAT8_E4M3FN),
    "ln-f32-fp8-only-q-looped": lambda: norm_quantize(7, 1000, torch.float32, DType.FLOAT8_E4M3FN, keep_y=False),
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    node, args = {**CASES, **FP8_CASES}[name]()
    configs = [{**c, "quantize": q} for c in ({"tile": 2048, "per_thread": 16, "max_row": 16384}, SMALL)
               for q in ("fused", "separate")]
    return run("triton.norm_quantize", node, args, configs, device)
