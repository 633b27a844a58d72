"""CPU tactics for Conv (float32).

- `cpu.onednn_conv`: 2-D/3-D convolution through oneDNN. Space: `weight` packed (reordered once, at build
  time, into the blocked layout oneDNN picks for the build's shapes; F.conv2d reorders it on every call, but a
  packed weight makes oneDNN write a channels-last output, which costs a conversion back), plain (as given), or
  auto (packed when the weight has at least as many elements as the output: late layers, small batches);
  `input_layout` nchw (as given) or nhwc (a channels-last copy of the input).
- `cpu.conv_channels_last`: F.conv2d on channels-last input and weight, the output converted back.
- `cpu.conv1x1_matmul`: a 1x1 convolution (any stride, no padding, one group) as a matrix product; space
  `layout`: nchw (W @ X per image) or nhwc (channel rows of X times W^T, one GEMM for the whole batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir.graph import Node, TensorType
from kiln.ir.ops.conv import Window, pad_nd
from kiln.kernels.base import Kernel, SubgraphRunner
from kiln.kernels.cpu.common import (
    F32,
    CpuTactic,
    constant,
    dtypes_in,
    empty,
    mkldnn_ops,
    prepared,
    rank,
    reference,
    static_shape,
)
from kiln.kernels.registry import register

Pads = list[tuple[int, int]]


def _fail(msg: str) -> ValueError:
    return ValueError(msg)


def _kernel_dims(node: Node) -> list[int] | None:
    w = static_shape(node, 1)
    return None if w is None else list(w[2:])


def window(node: Node) -> Window:
    kernel = _kernel_dims(node)
    assert kernel is not None
    return Window(node.attrs, len(kernel), kernel, _fail)


def _conv_supported(node: Node, ranks: Sequence[int]) -> bool:
    """A float32 Conv of one of `ranks` whose weight shape (so kernel size) is static."""
    r = rank(node, 0)
    return dtypes_in(node, F32) and r in ranks and rank(node, 1) == r and _kernel_dims(node) is not None


def symmetric(x: torch.Tensor, pads: Pads) -> tuple[torch.Tensor, list[int]]:
    """x and the per-axis padding a torch conv can take: asymmetric padding is applied to x first."""
    if all(b == e for b, e in pads):
        return x, [b for b, _ in pads]
    return pad_nd(x, pads), [0] * len(pads)


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


class OneDnnConv(CpuTactic):
    name = "cpu.onednn_conv"
    ops = frozenset({"Conv"})
    space = {"weight": ["auto", "packed", "plain"], "input_layout": ["nchw", "nhwc"]}
    priority = 500

    def supports(self, node: Node) -> bool:
        return mkldnn_ops("_convolution_pointwise", "_reorder_convolution_weight") and _conv_supported(node, (4, 5))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        win = window(node)
        groups = node.attrs["group"]
        geometry = (win.strides, win.dilations, groups)
        weight = self._weight(node, win) if _pack(node, config.get("weight", "auto")) else (lambda w: w)
        nhwc = config.get("input_layout", "nchw") == "nhwc"
        fallback = reference(node)
        conv = torch.ops.mkldnn._convolution_pointwise

        def run(xs: list[Any]) -> list[Any]:
            if empty(xs):
                return fallback(xs)
            x, pad = symmetric(xs[0], win.runtime_pads(list(xs[0].shape[2:])))
            if nhwc:
                x = x.contiguous(memory_format=_layout(x))
            b = xs[2] if len(xs) > 2 else None
            y = conv(x, weight(xs[1]), b, pad, *geometry, "none", [], "")
            return [y.contiguous()]

        return run

    @staticmethod
    def _weight(node: Node, win: Window) -> Callable[[torch.Tensor], torch.Tensor]:
        x = static_shape(node, 0)
        hint = None if x is None else list(x)
        pads = [b for b, _ in win.runtime_pads(hint[2:])] if hint else [0] * win.n
        geometry = (pads, win.strides, win.dilations, node.attrs["group"], hint)
        key = ("onednn_conv", *(tuple(g) if isinstance(g, list) else g for g in geometry))
        reorder = torch.ops.mkldnn._reorder_convolution_weight
        return prepared(node, 1, key, lambda w: reorder(w, *geometry))


def _pack(node: Node, mode: str) -> bool:
    w = constant(node, 1)
    if w is None or mode == "plain":
        return False
    out = node.outputs[0].type
    dims = out.shape if isinstance(out, TensorType) and out.shape is not None else ()
    return mode == "packed" or w.numel() >= math.prod(d if isinstance(d, int) else 1 for d in dims)


class ConvChannelsLast(CpuTactic):
    name = "cpu.conv_channels_last"
    ops = frozenset({"Conv"})
    priority = 1100

    def supports(self, node: Node) -> bool:
        return _conv_supported(node, (4,))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        win = window(node)
        groups = node.attrs["group"]
        weight = prepared(node, 1, "channels_last", lambda w: w.contiguous(memory_format=torch.channels_last))

        def run(xs: list[Any]) -> list[Any]:
            x, pad = symmetric(xs[0], win.runtime_pads(list(xs[0].shape[2:])))
            x = x.contiguous(memory_format=torch.channels_last)
            b = xs[2] if len(xs) > 2 else None
            y = F.conv2d(x, weight(xs[1]), b, win.strides, pad, win.dilations, groups)
            return [y.contiguous()]

        return run


def _no_padding(node: Node) -> bool:
    """A 1x1 kernel pads nothing under SAME_* and VALID; under NOTSET the pads must be 0."""
    pads = node.attrs.get("pads")
    return node.attrs["auto_pad"] != "NOTSET" or pads is None or not any(pads)


class Conv1x1MatMul(CpuTactic):
    name = "cpu.conv1x1_matmul"
    ops = frozenset({"Conv"})
    space = {"layout": ["nchw", "nhwc"]}
    priority = 1100

    def supports(self, node: Node) -> bool:
        return _conv_supported(node, (4,)) and _kernel_dims(node) == [1, 1] and node.attrs["group"] == 1 \
            and _no_padding(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        sh, sw = window(node).strides
        matrix = prepared(node, 1, "matrix", lambda w: w.reshape(w.shape[0], w.shape[1]).contiguous())
        by_rows = config.get("layout", "nchw") == "nhwc"

        def run(xs: list[Any]) -> list[Any]:
            x = xs[0] if (sh, sw) == (1, 1) else xs[0][:, :, ::sh, ::sw]
            b = xs[2] if len(xs) > 2 else None
            w = matrix(xs[1])
            return [_rows_times(x, w, b) if by_rows else _weight_times(x, w, b)]

        return run


def _weight_times(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(N, C, H, W) -> W[M, C] @ X[n] per image, as one broadcast batched product."""
    n, c, h, wd = x.shape
    y = torch.matmul(w, x.reshape(n, c, h * wd))
    if b is not None:
        y.add_(b[:, None])  # y is this kernel's own fresh tensor
    return y.reshape(n, w.shape[0], h, wd)


def _rows_times(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(N, C, H, W) -> one (N*H*W, C) @ W^T product over channels-last rows, then back to NCHW."""
    n, c, h, wd = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * wd, c)
    y = F.linear(rows, w, b)
    return y.reshape(n, h, wd, w.shape[0]).permute(0, 3, 1, 2).contiguous()


register(OneDnnConv())
register(ConvChannelsLast())
register(Conv1x1MatMul())
