"""The reference tactic: the op table's own torch implementation, for every op on every device.

It is the fallback that makes every graph runnable and the baseline every faster tactic is checked against.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Graph, Node
from kiln.ir.ops import OPS, get_op
from kiln.ir.ops.base import RefCtx
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.registry import register


class _AllOps(frozenset[str]):
    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in OPS


class Reference(Tactic):
    name = "reference"
    ops = _AllOps()
    priority = 1000

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        ref = get_op(node.op).ref
        runner = None if run_subgraph is None else _adapt(run_subgraph)
        ctx = RefCtx(node, runner)
        return lambda xs: list(ref(ctx, xs))


def _adapt(run: SubgraphRunner) -> Any:
    def runner(g: Graph, xs: list[Any]) -> list[Any]:
        return run(g, xs)

    return runner


register(Reference())
