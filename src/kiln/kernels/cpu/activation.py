"""CPU tactic for activations that torch computes in one fused pass where the reference composes several
elementwise ops (float32/float64): Swish with alpha 1 (SiLU), HardSwish, HardSigmoid with the hard-swish
constants (alpha 1/6, beta 1/2), Softplus, and PRelu with one slope per channel (or one for all)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner
from kiln.kernels.cpu.common import F32_F64, CpuTactic, dtypes_in, prepared, rank, static_shape
from kiln.kernels.registry import register

Unary = Callable[[torch.Tensor], torch.Tensor]


def _hard_sigmoid_constants(node: Node) -> bool:
    # float32 attributes: 1/6 arrives as 0.1666666716...
    return abs(node.attrs["alpha"] - 1 / 6) < 1e-7 and node.attrs["beta"] == 0.5


_UNARY: dict[str, tuple[Callable[[Node], bool], Unary]] = {
    "Swish": (lambda n: n.attrs["alpha"] == 1.0, F.silu),
    "HardSwish": (lambda n: True, F.hardswish),
    "HardSigmoid": (_hard_sigmoid_constants, F.hardsigmoid),
    "Softplus": (lambda n: True, F.softplus),
}


def _per_channel_slope(node: Node) -> bool:
    """PRelu's slope is one value, or one per channel (axis 1) of a rank >= 2 X, as F.prelu takes it."""
    slope, r = static_shape(node, 1), rank(node, 0)
    if slope is None or r is None or r < 2:
        return False
    if all(d == 1 for d in slope):
        return True
    dims = (1,) * (r - len(slope)) + slope
    return len(dims) == r and all(d == 1 for i, d in enumerate(dims) if i != 1)


class FusedActivation(CpuTactic):
    name = "cpu.activation"
    ops = frozenset({*_UNARY, "PRelu"})
    priority = 500

    def supports(self, node: Node) -> bool:
        if not dtypes_in(node, F32_F64):
            return False
        if node.op == "PRelu":
            return _per_channel_slope(node)
        return _UNARY[node.op][0](node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        if node.op == "PRelu":
            slope = prepared(node, 1, "flat", lambda s: s.reshape(-1).contiguous())
            return lambda xs: [F.prelu(xs[0], slope(xs[1]))]
        fn = _UNARY[node.op][1]
        return lambda xs: [fn(xs[0])]


register(FusedActivation())
