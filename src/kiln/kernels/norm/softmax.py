"""`triton.softmax`: Softmax and LogSoftmax over the last axis, in one read and one write of every element when
a row fits in registers, streamed (online max and sum for float32) when it does not."""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner
from kiln.kernels.norm.common import TritonTactic, dtype, floats, norm_axis, out_dtype, reference, tensor_type


class TritonSoftmax(TritonTactic):
    """Takes (Log)Softmax whose axis is the last one (axis -1 or rank - 1) of a float32/float16/bfloat16 tensor
    of known rank; other axes would need a strided or transposed kernel and are left to other tactics."""

    name = "triton.softmax"
    ops = frozenset({"Softmax", "LogSoftmax"})

    def supports(self, node: Node) -> bool:
        t = tensor_type(node.inputs[0])
        if t is None or t.rank is None or t.rank < 1:
            return False
        last = norm_axis(node.attrs["axis"], t.rank) == t.rank - 1
        return last and floats(node, [0]) and out_dtype(node) == dtype(node, 0)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        from kiln.kernels.norm import triton_kernels as tk

        log = node.op == "LogSoftmax"
        fallback = reference(node)

        def run(xs: list[Any]) -> list[Any]:
            if xs[0].numel() == 0:
                return fallback(xs)
            return [tk.softmax(xs[0], log, config)]

        return run
