"""Pointwise tactics (GPU): every Fused "pointwise" group, and every lone elementwise node the generator covers
(a Cast, a broadcast Mul), runs as one generated Triton kernel (`codegen`).

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
from kiln.kernels.pointwise.rules import RULES
from kiln.kernels.registry import register

__all__ = ["PointwiseKernel", "TritonPointwise", "check", "epilogue_graph", "supports", "triton_available"]


@functools.cache
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # why: a module blocked by sys.modules["triton"] = None has no spec
        return False


def body_of(node: Node) -> Graph | None:
    """The graph a pointwise kernel computes for `node`: a Fused "pointwise" node's body, or a lone elementwise
    node as a one-node graph whose inputs are the node's (constants included, passed at run time)."""
    if node.op == "Fused":
        body = node.attrs.get("body")
        if node.attrs.get("kind") != "pointwise" or not isinstance(body, Graph):
            return None
        return body if len(body.inputs) == len(node.inputs) else None
    if node.op not in RULES or node.op == "Expand" or len(node.outputs) != 1 or any(v is None for v in node.inputs):
        return None
    g = Graph(f"{node.name}_alone")
    ins = [g.add_input(f"in{i}", v.type) for i, v in enumerate(node.inputs) if v is not None]
    g.outputs.extend(g.add(node.op, list(ins), dict(node.attrs), name=node.name, outputs=1))
    g.outputs[0].type = node.outputs[0].type
    return g


class TritonPointwise(Tactic):
    """A pointwise group (or lone elementwise node) whose graph `supports()` accepts, as one Triton kernel on
    CUDA."""

    name = "triton.pointwise"
    ops = frozenset({"Fused", *RULES})
    devices = frozenset({"cuda"})
    # why: memory-bound kernels; on an H100 (ResNet-50, MobileNetV3 at batch 128) the twelve BLOCK x warps pairs
    # of an earlier space came within 3 % of each other on every group, and each is a compile
    space = {"BLOCK": (1024, 2048, 512), "num_warps": (4,)}
    priority = 50

    def applicable(self, node: Node, device: torch.device) -> bool:
        if not super().applicable(node, device) or not triton_available():
            return False
        body = body_of(node)
        return body is not None and supports(body)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        body = body_of(node)
        assert body is not None
        return PointwiseKernel(body, block=int(config.get("BLOCK", 1024)), num_warps=int(config.get("num_warps", 4)))


register(TritonPointwise())
