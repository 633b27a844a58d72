"""Cases for `triton.gather`: lookups along every axis position, negative indices, rows longer than a block, any
data dtype, int32 and int64 indices, no indices at all, and out-of-range indices (clamped reads, the node's
deferred check set once). Each compares every configuration with the op table's reference. Shared by the
interpreter test and the GPU tier."""

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


def _node(x: torch.Tensor, idx: torch.Tensor, axis: int) -> Node:
    g = Graph()
    xv = g.add_input("x", TensorType(DType.from_torch(x.dtype), tuple(x.shape)))
    iv = g.add_input("i", TensorType(DType.from_torch(idx.dtype), tuple(idx.shape)))
    g.outputs.append(g.add("Gather", [xv, iv], {"axis": axis}, name="lookup")[0])
    return g.nodes[0]


def _run(x: torch.Tensor, idx: torch.Tensor, axis: int = 0, device: str = "cpu",
         want_idx: torch.Tensor | None = None, bad: bool = False) -> dict[str, str | None]:
    """{config: what differs, or None}: the tactic's output against the reference on `want_idx` (the indices as
    the kernel should have clamped them; `idx` itself when all are in range), and the check set exactly when
    `bad`, then clear."""
    node = _node(x, idx, axis)
    t = registry.get("triton.gather")
    if not t.applicable(node, CUDA):
        return {"applicable": "refused"}
    want = OPS["Gather"].ref(RefCtx(node), [x, idx if want_idx is None else want_idx])[0]
    out: dict[str, str | None] = {}
    for cfg in t.configs():
        kernel = t.build(node, cfg, CUDA)
        got = kernel([x.to(device), idx.to(device)])[0].cpu()
        (check,) = kernel.checks  # type: ignore[attr-defined]
        problems = []
        if got.dtype != want.dtype or got.shape != want.shape:
            problems.append(f"got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}")
        elif not torch.equal(got, want):
            problems.append(f"values differ at {int((got != want).sum())} places")
        said = check.raised()
        if (said is not None) != bad or (bad and "node 'lookup' (Gather): an index is out of range" not in said):
            problems.append(f"check said {said!r}, expected {'a message' if bad else 'nothing'}")
        if check.raised() is not None:
            problems.append("the check did not clear once read")
        out[str(cfg)] = "; ".join(problems) or None
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CASES: dict[str, Callable[[str], dict[str, str | None]]] = {
    # an embedding table [30, 8]: token ids [2, 5], negative ones wrapping
    "embedding-f32": lambda d: _run(torch.randn(30, 8, generator=_gen(0)),
                                    torch.tensor([[1, -1, 0, 29, 7], [3, -30, 2, 2, 9]]), device=d),
    # the middle axis of [3, 5, 7] in float16 with int32 indices
    "axis-1-f16-int32": lambda d: _run(torch.randn(3, 5, 7, generator=_gen(1)).half(),
                                       torch.tensor([4, -5, 0], dtype=torch.int32), axis=1, device=d),
    # rows of 3000 elements: several programs per row for every block size
    "long-rows-bf16": lambda d: _run(torch.randn(6, 3000, generator=_gen(2)).bfloat16(),
                                     torch.tensor([5, 0, 5, -2]), device=d),
    # the last axis (inner = 1), int64 data, a scalar index
    "last-axis-int64": lambda d: _run(torch.arange(24).reshape(2, 3, 4), torch.tensor(-1), axis=2, device=d),
    "bool-data": lambda d: _run(torch.rand(4, 6, generator=_gen(3)) > 0.5, torch.tensor([[3], [0]]), device=d),
    "no-indices": lambda d: _run(torch.randn(4, 6), torch.zeros(0, dtype=torch.int64), device=d),
    # out of range both ways: clamped reads (no fault), the check set and cleared once read
    "out-of-range": lambda d: _run(torch.randn(10, 4, generator=_gen(4)), torch.tensor([[1, 10], [-11, 2]]),
                                   device=d, want_idx=torch.tensor([[1, 9], [0, 2]]), bad=True),
}


def run_case(name: str, device: str = "cpu") -> Any:
    return CASES[name](device)
