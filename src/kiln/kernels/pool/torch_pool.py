"""`cuda.pool`: MaxPool (values only) and AveragePool through torch's pooling kernels (cuDNN / ATen), 1-3 spatial
axes, in the input's memory format (channels-last stays channels-last); GlobalAveragePool as a mean.

The reference gathers every window with unfold (a copy kernel-size times the input). Padding torch cannot take
(asymmetric, or more than half the kernel) is applied first where that is exact, as in the CPU tactic
(`kernels/cpu/pool.py`, whose window arithmetic this shares); what remains runs the reference.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, TensorType
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.cpu.pool import pool_kernel
from kiln.kernels.registry import register

HALF_AND_SINGLE = frozenset({DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32})


def _float_io(node: Node) -> bool:
    vals = [node.inputs[0], *node.outputs]
    return all(v is not None and isinstance(v.type, TensorType) and v.type.dtype in HALF_AND_SINGLE for v in vals)


class CudaPool(Tactic):
    name = "cuda.pool"
    ops = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool"})
    devices = frozenset({"cuda"})
    priority = 45

    def applicable(self, node: Node, device: torch.device) -> bool:
        x = node.inputs[0]
        if device.type not in self.devices or x is None or len(node.outputs) != 1 or not _float_io(node):
            return False
        r = x.rank
        if node.op == "GlobalAveragePool":
            return r is not None and r >= 3
        if r not in (3, 4, 5) or len(node.attrs["kernel_shape"]) != r - 2:
            return False
        dilations = node.attrs.get("dilations")
        return node.op == "MaxPool" or dilations is None or all(d == 1 for d in dilations)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        if node.op == "GlobalAveragePool":
            def mean(xs: list[Any]) -> list[Any]:
                x = xs[0]
                return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]

            return mean
        return pool_kernel(node, nhwc=False, contiguous=False)


register(CudaPool())
