"""CPU tactic for MaxPool (values only) and AveragePool through torch's pooling kernels (1-3 spatial axes,
float32/float64); the reference gathers every window with unfold instead. Space: `layout` nhwc (pool a
channels-last copy, then convert back: torch's channels-last kernels are much faster once there are more than
a few channels) or nchw (as given).

torch takes symmetric padding of at most half the kernel. Other padding is applied to X first where that is
exact (MaxPool with -inf; AveragePool counting the padding); what remains (ceil_mode with such padding,
AveragePool not counting it) runs the reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir.graph import Node
from kiln.ir.ops.conv import Window, pad_nd
from kiln.kernels.base import Kernel, SubgraphRunner
from kiln.kernels.cpu.common import F32_F64, CpuTactic, dtypes_in, empty, rank, reference
from kiln.kernels.registry import register

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _fail(msg: str) -> ValueError:
    return ValueError(msg)


class TorchPool(CpuTactic):
    name = "cpu.pool"
    ops = frozenset({"MaxPool", "AveragePool"})
    space = {"layout": ["nhwc", "nchw"]}
    priority = 500

    def supports(self, node: Node) -> bool:
        r = rank(node, 0)
        if r not in (3, 4, 5) or len(node.outputs) != 1 or not dtypes_in(node, F32_F64):
            return False
        if len(node.attrs["kernel_shape"]) != r - 2:
            return False
        dilations = node.attrs.get("dilations")
        return node.op == "MaxPool" or dilations is None or all(d == 1 for d in dilations)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        return pool_kernel(node, nhwc=config.get("layout", "nhwc") == "nhwc", contiguous=True)


def pool_kernel(node: Node, *, nhwc: bool, contiguous: bool) -> Kernel:
    """MaxPool / AveragePool through torch's kernels. `nhwc`: pool a channels-last copy; `contiguous`: return a
    row-major result (else the result keeps torch's memory format)."""
    kernel = list(node.attrs["kernel_shape"])
    win = Window(node.attrs, len(kernel), kernel, _fail)
    fallback = reference(node)
    is_max = node.op == "MaxPool"
    include_pad = is_max or bool(node.attrs["count_include_pad"])
    nhwc = nhwc and len(kernel) > 1

    def run(xs: list[Any]) -> list[Any]:
        x = xs[0]
        pads = win.runtime_pads(list(x.shape[2:]))
        fits = all(b == e and 2 * b <= k for (b, e), k in zip(pads, kernel))
        if empty(xs) or (not fits and (win.ceil_mode or not include_pad)):
            return fallback(xs)
        pad = [b for b, _ in pads]
        if not fits:
            x, pad = pad_nd(x, pads, -math.inf if is_max else 0.0), [0] * len(kernel)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        if is_max:
            y = _MAX[len(kernel)](x, kernel, win.strides, pad, win.dilations, win.ceil_mode)
        else:
            y = _AVG[len(kernel)](x, kernel, win.strides, pad, win.ceil_mode, include_pad)
        return [y.contiguous() if contiguous else y]

    return run


register(TorchPool())
