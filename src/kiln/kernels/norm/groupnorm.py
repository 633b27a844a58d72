"""`triton.groupnorm`: GroupNormalization and InstanceNormalization (one group per channel) on [N, C, *spatial].

A group is contiguous in memory, so it is a row of C / groups * spatial elements with a per-channel affine.
Groups that fit in registers take one read and one write; larger ones are split over several programs (partial
Welford statistics, then a read and a write), so that a few huge groups still fill the GPU."""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner
from kiln.kernels.norm.common import TritonTactic, floats, reference, shape


class TritonGroupNorm(TritonTactic):
    """Takes GroupNormalization (stash_type float32) and InstanceNormalization on float32/float16/bfloat16 tensors
    of known rank >= 2 with 1-D per-channel scale and bias. GroupNormalization rounds its affine steps to X's dtype
    as the reference does; InstanceNormalization keeps them in float32."""

    name = "triton.groupnorm"
    ops = frozenset({"GroupNormalization", "InstanceNormalization"})

    def supports(self, node: Node) -> bool:
        x = shape(node, 0)
        if x is None or len(x) < 2 or not floats(node, [0, 1, 2]):
            return False
        if node.op == "GroupNormalization" and node.attrs["stash_type"] is not DType.FLOAT32:
            return False
        return all(s is not None and len(s) == 1 for s in (shape(node, 1), shape(node, 2)))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        from kiln.kernels.norm import triton_kernels as tk

        instance = node.op == "InstanceNormalization"
        eps = float(node.attrs["epsilon"])
        fallback = reference(node)

        def run(xs: list[Any]) -> list[Any]:
            x, w, b = xs[0], xs[1], xs[2]
            ch = x.shape[1]
            groups = ch if instance else node.attrs["num_groups"]
            if x.numel() == 0 or ch % groups or w.numel() != ch or b.numel() != ch:
                return fallback(xs)
            return [tk.groupnorm(x, w, b, groups, eps, torch.float32 if instance else x.dtype, config)]

        return run
