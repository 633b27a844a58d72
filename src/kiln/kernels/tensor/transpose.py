"""`cuda.transpose`: a Transpose that moves no data when the permuted tensor is already laid out in memory as its
reader wants it.

A channels-last [N, C, H, W] tensor is, in memory, a row-major [N, H, W, C] one: ConvNeXt's
Transpose(0, 2, 3, 1) before its LayerNorm and Linear layers, and Transpose(0, 3, 1, 2) back to the next
convolution's channels-last input, are then views. The reference (permute, then a row-major copy) made the
second one a copy to NCHW, which the runtime converted back to channels-last: two passes over the activation
for nothing. Here the permuted view is returned when it is row-major, or channels-last where the plan keeps the
output channels-last (`channels_last_outputs`, set by `base.plan_layouts`); otherwise a row-major copy, as the
reference makes.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Node, TensorType
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.registry import register


class TransposeKernel:
    def __init__(self, perm: list[int] | None) -> None:
        self.perm = perm
        self.channels_last_outputs: tuple[bool, ...] = ()

    def __call__(self, xs: list[Any]) -> list[Any]:
        x = xs[0]
        y = x.permute(self.perm if self.perm is not None else list(range(x.dim() - 1, -1, -1)))
        if y.is_contiguous():
            return [y]
        if self.channels_last_outputs[:1] == (True,) and y.dim() == 4 \
                and y.is_contiguous(memory_format=torch.channels_last):
            return [y]
        return [y.contiguous()]


class CudaTranspose(Tactic):
    name = "cuda.transpose"
    ops = frozenset({"Transpose"})
    devices = frozenset({"cuda"})
    priority = 45

    def applicable(self, node: Node, device: torch.device) -> bool:
        x = node.inputs[0]
        return device.type in self.devices and x is not None and isinstance(x.type, TensorType) \
            and x.type.rank is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        rank = node.inputs[0].type.rank  # type: ignore[union-attr]
        perm = node.attrs.get("perm")
        return TransposeKernel(None if perm is None else [int(p) % rank for p in perm])


register(CudaTranspose())
