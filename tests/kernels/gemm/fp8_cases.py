"""QuantizeLinear-to-float8 cases for `triton.fp8_quantize`, compared code for code with the op table's reference on
a GPU (the GPU tier). Not run under the Triton CPU interpreter: its float8 conversion is wrong (31.9 -> 16.0, NaN ->
384 with triton 3.9), so it could not tell a right kernel from a wrong one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry

CUDA = torch.device("cuda")


def quantize_node(dt: DType, shape: tuple[int, ...], scale: float) -> tuple[Node, list[Any]]:
    g = Graph()
    x = g.add_input("x", TensorType(dt, shape))
    s = g.add_initializer("s", torch.tensor(scale, dtype=dt.torch))
    z = g.add_initializer("z", torch.zeros((), dtype=torch.float8_e4m3fn))
    (y,) = g.add("QuantizeLinear", [x, s, z], name="q")
    g.outputs.append(y)
    data = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 200 * scale
    flat = data.view(-1)
    flat[:4] = torch.tensor([1e6, -1e6, float("nan"), 0.0])  # saturation both ways, NaN kept, zero
    return g.nodes[0], [data.to(dt.torch), s.data, z.data]


def run(node: Node, args: list[Any], device: str = "cuda") -> dict[str, str | None]:
    t = registry.get("triton.fp8_quantize")
    if not t.applicable(node, CUDA):
        return {"applicable": "refused"}
    want = OPS["QuantizeLinear"].ref(RefCtx(node), list(args))[0]
    got = t.build(node, {}, CUDA)([a.to(device) for a in args])[0].cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        return {"result": f"got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"}
    differ = int((got.view(torch.uint8) != want.view(torch.uint8)).sum())
    return {"result": None if differ == 0 else f"{differ} codes differ"}


CASES: dict[str, Callable[[], tuple[Node, list[Any]]]] = {
    "fp16-saturate-nan": lambda: quantize_node(DType.FLOAT16, (3, 1000), 0.05),
    "fp32-ragged": lambda: quantize_node(DType.FLOAT32, (7, 33), 0.01),
}


def run_case(name: str, device: str = "cuda") -> dict[str, str | None]:
    node, args = CASES[name]()
    return run(node, args, device)
