"""Float8 cases for the GPU tier: QuantizeLinear to float8 for `triton.fp8_quantize`, compared code for code with the
op table's reference, and float8 GEMM layers for `triton.fp8_gemm`, judged as the tuner judges a candidate. Not run
under the Triton CPU interpreter: its float8 conversion is wrong (31.9 -> 16.0, NaN -> 384 with triton 3.9), so it
could not tell a right kernel from a wrong one."""

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


def fp8_layer(lead: tuple[int, ...], k: int, n: int, **kw: Any) -> tuple[Node, list[Any]]:
    """A folded float8 GEMM layer (`tests.kernels.gemm.int8_cases.quantized` with fp8=True) and its inputs."""
    from tests.kernels.gemm.int8_cases import quantized

    return quantized(lead, k, n, fp8=True, **kw)


def run_gemm(node: Node, args: list[Any], tiles: tuple[str, ...],
             tactic: str = "triton.fp8_gemm") -> dict[str, str | None]:
    """{tile: why the tuner would reject `tactic`'s result, or None} against the folded node's reference on the GPU
    (and, for float8 outputs, the layer computed from float32-widened inputs, as the tuner does)."""
    from kiln.tune.tuner import _as_accurate, _close, _codes_as_accurate, _one_step

    t = registry.get(tactic)
    if not t.applicable(node, CUDA):
        return {"applicable": "refused"}
    on = [a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in args]
    want = OPS["Fused"].ref(RefCtx(node), list(on))[0]
    wide_args = [a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a
                 for a in on]
    wide = OPS["Fused"].ref(RefCtx(node), wide_args)[0]
    out: dict[str, str | None] = {}
    for tile in tiles:
        got = t.build(node, {"tile": tile}, CUDA)(list(on))[0]
        if got.dtype != want.dtype or got.shape != want.shape:
            out[tile] = f"got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
        elif _close(got, want) or _one_step(got, want) or _as_accurate(got, want, wide) \
                or _codes_as_accurate(got, want, wide):
            out[tile] = None
        else:
            diff = (got.float() - want.float()).abs()
            out[tile] = f"max |diff| {float(diff.max()):.4g}, {float((diff > 0).float().mean()):.4f} differ"
    return out


def run_case(name: str, device: str = "cuda") -> dict[str, str | None]:
    node, args = CASES[name]()
    return run(node, args, device)
