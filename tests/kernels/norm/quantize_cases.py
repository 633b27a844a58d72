"""`triton.norm_quantize` cases: a LayerNormalization / RMSNormalization whose result a per-tensor QuantizeLinear
reads, fused by `fuse_output_quantize` into one "quantizing" node, against that node's reference (the body: the norm,
then the quantize). Shared by the interpreter test (CPU; int8/uint8 only: the interpreter's float8 conversion is
wrong) and the GPU tier (float8 too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.precision.quantize import fuse_output_quantize

CUDA = torch.device("cuda")
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
    top = 448.0 if out is DType.FLOAT8_E4M3FN else 127.0
    s = g.add_initializer("s", torch.tensor(3.0 / top, dtype=dt))  # |y| up to ~4: a few saturate
    q_ins = [y, s]
    if out is not DType.FLOAT8_E4M3FN or zero:
        q_ins.append(g.add_initializer("z", torch.tensor(zero).to(out.torch)))
    (yq,) = g.add("QuantizeLinear", q_ins, {"output_dtype": out} if len(q_ins) == 2 else {}, name="q")
    g.outputs.append(yq)
    if keep_y:
        g.outputs.append(y)
    assert fuse_output_quantize(g) == ["norm"]
    node = g.nodes[0]
    data = torch.randn(rows, n, generator=gen) * 2.0 + 0.3
    return node, [data.to(dt) if v is x else v.data for v in node.inputs]  # type: ignore[union-attr]


def run(node: Node, args: list[Any], configs: list[dict[str, Any]], device: str = "cpu") -> dict[str, str | None]:
    """{config: what differs from the reference, or None}. The float result may differ in its last bit (float32
    statistics summed in another order); the 8-bit values are then rarely one step apart (a value at a rounding
    boundary), never more."""
    from kiln.tune.tuner import _one_step

    t = registry.get("triton.norm_quantize")
    if not t.applicable(node, CUDA):
        return {"applicable": "refused"}
    want = OPS["Fused"].ref(RefCtx(node), list(args))
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out: dict[str, str | None] = {}
    for cfg in configs:
        label = ",".join(f"{k}={v}" for k, v in cfg.items())
        got = [g.cpu() for g in t.build(node, cfg, CUDA)(list(moved))]
        if len(got) != len(want) or any(a.dtype != b.dtype or a.shape != b.shape for a, b in zip(got, want)):
            out[label] = f"got {[(a.dtype, tuple(a.shape)) for a in got]}"
            continue
        problem = None
        for a, b in zip(got, want):
            if b.is_floating_point() and b.element_size() > 1:
                tol = 1e-2 if b.dtype == torch.float16 else 1e-5
                if not torch.allclose(a.double(), b.double(), rtol=tol, atol=tol):
                    problem = f"float result: max |diff| {float((a.double() - b.double()).abs().max()):.3g}"
            elif not _one_step(a, b):
                a8 = a.view(torch.uint8).int() if a.dtype == torch.float8_e4m3fn else a.int()
                b8 = b.view(torch.uint8).int() if b.dtype == torch.float8_e4m3fn else b.int()
                problem = f"8-bit result: {int((a8 != b8).sum())} of {a8.numel()} differ"
        out[label] = problem
    return out


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
    return run(node, args, configs, device)
