"""CPU tactics for the softmax family and the normalizations: torch's fused one-pass kernels where the
reference spells the math out step by step (float32 only; statistics in float32, as `stash_type` says).

- `cpu.softmax`: Softmax / LogSoftmax (float32, float64) through torch.softmax / torch.log_softmax.
- `cpu.layer_norm`: LayerNormalization (Mean and InvStdDev too, through native_layer_norm) and
  RMSNormalization, when Scale and B vary only along the normalized axes.
- `cpu.batch_norm`: inference BatchNormalization; `cpu.group_norm`; `cpu.instance_norm` (as a group norm with
  one group per channel).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner
from kiln.kernels.cpu.common import F32, F32_F64, CpuTactic, dtypes_in, present, rank, static_shape
from kiln.kernels.registry import register


def _axis(node: Node) -> int | None:
    r = rank(node, 0)
    if r is None:
        return None
    axis = node.attrs["axis"]
    return axis + r if -r <= axis < 0 else axis if 0 <= axis < r else None


class Softmax(CpuTactic):
    name = "cpu.softmax"
    ops = frozenset({"Softmax", "LogSoftmax"})
    priority = 500

    def supports(self, node: Node) -> bool:
        return dtypes_in(node, F32_F64) and _axis(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        axis = _axis(node)
        assert axis is not None
        fn = torch.log_softmax if node.op == "LogSoftmax" else torch.softmax
        return lambda xs: [fn(xs[0], axis)]


def _per_normalized(node: Node, i: int, axis: int) -> bool:
    """Input i (static shape) broadcasts to X and varies only along the normalized axes [axis, rank)."""
    shape, r = static_shape(node, i), rank(node, 0)
    if shape is None or r is None or len(shape) > r:
        return False
    lead = len(shape) - (r - axis)
    return all(d == 1 for d in shape[:max(lead, 0)])


def _affine(t: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """A Scale or B as a tensor of the normalized shape (its leading 1s dropped, then broadcast)."""
    if t is None:
        return None
    k = len(shape)
    if t.shape == shape:
        return t
    return t.reshape(t.shape[max(t.dim() - k, 0):]).expand(shape).contiguous()


class LayerNorm(CpuTactic):
    name = "cpu.layer_norm"
    ops = frozenset({"LayerNormalization", "RMSNormalization"})
    priority = 500

    def supports(self, node: Node) -> bool:
        axis = _axis(node)
        if axis is None or node.attrs["stash_type"] is not DType.FLOAT32 or not dtypes_in(node, F32):
            return False
        if node.op == "RMSNormalization" and not hasattr(F, "rms_norm"):
            return False
        return all(_per_normalized(node, i, axis) for i in (1, 2) if present(node, i))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        axis, eps, outs = _axis(node), node.attrs["epsilon"], len(node.outputs)
        assert axis is not None
        rms = node.op == "RMSNormalization"

        def run(xs: list[Any]) -> list[Any]:
            x = xs[0]
            shape = x.shape[axis:]
            w, b = _affine(xs[1], shape), _affine(xs[2] if len(xs) > 2 else None, shape)
            if rms:
                return [F.rms_norm(x, list(shape), w, eps)]
            if outs == 1:
                return [F.layer_norm(x, list(shape), w, b, eps)]
            y, mean, inv_std = torch.native_layer_norm(x, list(shape), w, b, eps)
            stats = (*x.shape[:axis], *([1] * len(shape)))
            return [y, mean.reshape(stats), inv_std.reshape(stats)]

        return run


def _vectors(node: Node, inputs: range) -> bool:
    return all(rank(node, i) == 1 for i in inputs)


class BatchNorm(CpuTactic):
    name = "cpu.batch_norm"
    ops = frozenset({"BatchNormalization"})
    priority = 500

    def supports(self, node: Node) -> bool:
        return (not node.attrs["training_mode"] and len(node.outputs) == 1 and dtypes_in(node, F32)
                and (rank(node, 0) or 0) >= 2 and _vectors(node, range(1, 5)))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        eps = node.attrs["epsilon"]
        return lambda xs: [F.batch_norm(xs[0], xs[3], xs[4], xs[1], xs[2], False, 0.0, eps)]


class InstanceNorm(CpuTactic):
    name = "cpu.instance_norm"
    ops = frozenset({"InstanceNormalization"})
    priority = 500

    def supports(self, node: Node) -> bool:
        return dtypes_in(node, F32) and (rank(node, 0) or 0) >= 3 and _vectors(node, range(1, 3))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        eps = node.attrs["epsilon"]
        # One group per channel: torch's group norm kernel is a single pass, its instance norm is not.
        return lambda xs: [F.group_norm(xs[0], xs[0].shape[1], xs[1], xs[2], eps)]


class GroupNorm(CpuTactic):
    name = "cpu.group_norm"
    ops = frozenset({"GroupNormalization"})
    priority = 500

    def supports(self, node: Node) -> bool:
        return (node.attrs["stash_type"] is DType.FLOAT32 and dtypes_in(node, F32)
                and (rank(node, 0) or 0) >= 2 and _vectors(node, range(1, 3)))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        groups, eps = node.attrs["num_groups"], node.attrs["epsilon"]
        return lambda xs: [F.group_norm(xs[0], groups, xs[1], xs[2], eps)]


for _t in (Softmax(), LayerNorm(), BatchNorm(), InstanceNorm(), GroupNorm()):
    register(_t)
