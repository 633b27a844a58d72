"""`triton.layernorm` and `triton.rmsnorm`: LayerNormalization and RMSNormalization over the trailing axes
[axis, rank), float32 statistics, one read and one write of every element when a row fits in registers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner
from kiln.kernels.norm.common import TritonTactic, floats, norm_axis, present, reference, shape, static_ints


def _drop_leading_ones(dims: Sequence[Any]) -> tuple[Any, ...]:
    i = 0
    while i < len(dims) and dims[i] == 1:
        i += 1
    return tuple(dims[i:])


def _axis(node: Node) -> int | None:
    s = shape(node, 0)
    return None if s is None else norm_axis(node.attrs["axis"], len(s))


def _full_shape(node: Node, i: int, axis: int) -> bool:
    """Input i holds one value per normalized element: its shape is X's normalized shape (static), give or take
    leading 1s. (Other broadcasts, e.g. one value for every row, are left to other tactics.)"""
    x, s = shape(node, 0), shape(node, i)
    if x is None or s is None or not static_ints(s) or len(s) > len(x):
        return False
    normalized = x[axis:]
    return static_ints(normalized) and _drop_leading_ones(s) == _drop_leading_ones(normalized)


def _supported(node: Node, inputs: list[int]) -> bool:
    axis = _axis(node)
    if axis is None or node.attrs["stash_type"] is not DType.FLOAT32 or not floats(node, inputs):
        return False
    return all(_full_shape(node, i, axis) for i in inputs[1:] if present(node, i))


class TritonLayerNorm(TritonTactic):
    """Takes LayerNormalization with stash_type float32, float32/float16/bfloat16 tensors, a static normalized
    shape X.shape[axis:], and Scale (and B, if given) of exactly that shape (leading 1s allowed). Mean and
    InvStdDev are produced when the node asks for them (float32, X's leading dims then 1s)."""

    name = "triton.layernorm"
    ops = frozenset({"LayerNormalization"})

    def supports(self, node: Node) -> bool:
        return _supported(node, [0, 1, 2])

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        return _kernel(node, config, rms=False)


class TritonRMSNorm(TritonTactic):
    """Takes RMSNormalization under the same rules as `triton.layernorm` (Y in scale's dtype, as the op says)."""

    name = "triton.rmsnorm"
    ops = frozenset({"RMSNormalization"})

    def supports(self, node: Node) -> bool:
        return _supported(node, [0, 1])

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        return _kernel(node, config, rms=True)


def _kernel(node: Node, config: dict[str, Any], rms: bool) -> Kernel:
    from kiln.kernels.norm import triton_kernels as tk

    axis, eps = _axis(node), float(node.attrs["epsilon"])
    assert axis is not None
    stats = len(node.outputs) > 1
    fallback = reference(node)

    def run(xs: list[Any]) -> list[Any]:
        x, w = xs[0], xs[1]
        b = xs[2] if len(xs) > 2 else None
        n = math.prod(x.shape[axis:])
        if x.numel() == 0 or w.numel() != n or (b is not None and b.numel() != n):
            return fallback(xs)
        y, mean, rstd = tk.layernorm(x, w, b, n, eps, rms, stats, config)
        if mean is None or rstd is None:
            return [y]
        dims = (*x.shape[:axis], *([1] * (x.dim() - axis)))
        return [y, mean.reshape(dims), rstd.reshape(dims)]

    return run
