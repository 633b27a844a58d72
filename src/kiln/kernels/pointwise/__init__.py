"""Pointwise tactics (GPU): every Fused "pointwise" group runs as one generated Triton kernel (`codegen`).

The GEMM/conv epilogue templates reuse the same generator through `epilogue_graph` + `PointwiseKernel`.
Importing this package needs no triton; without it the tactic is simply not applicable.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

from kiln.ir.graph import Graph, Node
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.pointwise.codegen import PointwiseKernel, check, epilogue_graph, supports
from kiln.kernels.registry import register

__all__ = ["PointwiseKernel", "TritonPointwise", "check", "epilogue_graph", "supports", "triton_available"]


@functools.cache
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # why: a module blocked by sys.modules["triton"] = None has no spec
        return False


class TritonPointwise(Tactic):
    """A Fused node of kind "pointwise" whose body `supports()` accepts, as one Triton kernel on CUDA."""

    name = "triton.pointwise"
    ops = frozenset({"Fused"})
    devices = frozenset({"cuda"})
    space = {"BLOCK": (1024, 2048, 4096, 512), "num_warps": (4, 8, 2)}
    priority = 50

    def applicable(self, node: Node, device: torch.device) -> bool:
        if not super().applicable(node, device) or node.attrs.get("kind") != "pointwise":
            return False
        body = node.attrs.get("body")
        return (isinstance(body, Graph) and len(body.inputs) == len(node.inputs) and triton_available()
                and supports(body))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        kernel = PointwiseKernel(node.attrs["body"], block=int(config.get("BLOCK", 1024)),
                                 num_warps=int(config.get("num_warps", 4)))
        return lambda xs: kernel(xs)


register(TritonPointwise())
