"""`triton.residual_norm` cases: a "residual_norm" Fused node (Add(a, r) -> s, then LayerNorm/RMSNorm of s; the
outputs [Y], or [s, Y] when the node keeps the sum) judged against the node's reference as the tuner judges a
candidate (`tests.kernels.quantizing.run`). Shared by the interpreter test (CPU; float32/float16) and the GPU tier
(bfloat16 too, and BERT's and ViT's row sizes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.passes.residual_norm import fuse_residual_norm
from tests.kernels.quantizing import run

DEFAULT = {"tile": 2048, "per_thread": 16, "max_row": 16384}
ONE_ROW = {"tile": 256, "per_thread": 8, "max_row": 1024}
"""One row a program (tile // row < 2)."""
STREAMED = {"tile": 256, "per_thread": 8, "max_row": 512}
"""Rows longer than 512 elements are streamed: the residual is added by torch first."""


def residual_norm(rows: int, n: int, dt: torch.dtype, *, rms: bool = False, bias: bool = True,
                  keep_sum: bool = False, offset: float = 0.0, seed: int = 3) -> tuple[Node, list[Any]]:
    """The fused node of norm(a + r) and its inputs. `keep_sum`: the sum is a graph output too, so the node writes
    it. `offset` shifts a so that rounding the sum to `dt` matters."""
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    t = TensorType(DType.from_torch(dt), (rows, n))
    a, r = g.add_input("a", t), g.add_input("r", t)
    w = g.add_initializer("w", (torch.randn(n, generator=gen) * 0.5 + 1.0).to(dt))
    (s,) = g.add("Add", [a, r], name="residual")
    ins = [s, w]
    if bias and not rms:
        ins.append(g.add_initializer("b", (torch.randn(n, generator=gen) * 0.2).to(dt)))
    (y,) = g.add("RMSNormalization" if rms else "LayerNormalization", ins, {"axis": -1, "epsilon": 1e-5},
                 name="norm", outputs=1)
    g.outputs += [s, y] if keep_sum else [y]  # a sum read elsewhere (pre-LN's residual stream) is written too
    assert fuse_residual_norm(g).changed
    node = g.nodes[0]
    assert len(node.outputs) == (2 if keep_sum else 1)
    data = {a: torch.randn(rows, n, generator=gen) * 2.0 + offset, r: torch.randn(rows, n, generator=gen) * 0.3}
    args = [data[v].to(dt) if v in data else v.data for v in node.inputs]  # type: ignore[union-attr]
    return node, args


CASES: dict[str, Callable[[], tuple[Node, list[Any]]]] = {
    "ln-f16-768": lambda: residual_norm(37, 768, torch.float16),
    "ln-f16-rounded-sum": lambda: residual_norm(16, 96, torch.float16, offset=1000.0),
    "ln-f32-keep-sum": lambda: residual_norm(9, 96, torch.float32, keep_sum=True),
    "ln-f16-no-bias-odd-row": lambda: residual_norm(5, 100, torch.float16, bias=False),
    "rms-f16-keep-sum": lambda: residual_norm(6, 64, torch.float16, rms=True, keep_sum=True),
}
GPU_CASES: dict[str, Callable[[], tuple[Node, list[Any]]]] = {
    "ln-f16-bert-bs128": lambda: residual_norm(128 * 128, 768, torch.float16),
    "ln-bf16-keep-sum-vit": lambda: residual_norm(197, 768, torch.bfloat16, keep_sum=True),
    "rms-bf16-4096": lambda: residual_norm(7, 4096, torch.bfloat16, rms=True),
}


def strict(node: Node, args: list[Any], device: str) -> str | None:
    """Beyond the tuner's check (which takes a result at least as accurate as the reference's): the kernel rounds
    the sum where the Add does, so Y is the reference's within a few units in the last place (a sum left unrounded
    moves a row's statistics by up to half a unit of the sum's type: the "rounded-sum" case sees it)."""
    from kiln.ir.ops import OPS
    from kiln.ir.ops.base import RefCtx
    from kiln.kernels import registry

    want = OPS["Fused"].ref(RefCtx(node), list(args))
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    got = registry.get("triton.residual_norm").build(node, DEFAULT, torch.device("cuda"))(moved)
    for k, (a, b) in enumerate(zip(got, want)):
        a, b = a.cpu().double(), b.double()
        ulp = torch.finfo(want[k].dtype).eps * b.abs().clamp(min=1.0)
        worst = float(((a - b).abs() / ulp).max())
        if worst > 4:
            return f"output {k}: {worst:.1f} units in the last place from the reference"
    return None


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    node, args = {**CASES, **GPU_CASES}[name]()
    out = run("triton.residual_norm", node, args, [DEFAULT, ONE_ROW, STREAMED], device)
    out["strict"] = strict(node, args, device)
    return out
