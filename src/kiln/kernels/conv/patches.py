"""`cuda.patch_conv`: a 2-D Conv whose windows tile the input without overlap (kernel = stride, no padding, no
dilation, one group) - the patch embedding of vision transformers - as one permuting copy and one cuBLAS GEMM.

With non-overlapping windows the im2col matrix is a pure permutation of the input: [N, C, OH, kh, OW, kw] ->
[N * OH * OW, C * kh * kw], copied once, then multiplied by the weight laid out at build time as
[C * kh * kw, O] (the bias through addmm). The GEMM's rows are output pixels, so its result is the conv output in
channels-last order; the epilogue steps run on it in place (`kiln.kernels.epilogue.tail`), and it is handed on
channels-last when the input was (the layout its readers expect), else copied to NCHW. cuDNN has no fast kernel
for this shape: on an H100, ViT-B/16's 16x16 / stride 16 patch conv (3 -> 768 channels, batch 128, float16) took
1.09 ms through cuDNN for 30 GFLOP of work.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.conv.cudnn import _params
from kiln.kernels.cpu.common import prepared
from kiln.kernels.epilogue import Anchored, tail
from kiln.kernels.registry import register
from kiln.utils.errors import InputError

ANCHORS = frozenset({"Conv"})


def _patch(a: Anchored) -> tuple[int, int] | None:
    """(kh, kw) when the anchor is a conv with non-overlapping windows that tile the input, else None."""
    params = _params(a)
    w = a.constant(1)
    if params is None or w is None or w.dim() != 4:
        return None
    k, strides, pads, dil, groups = params
    kh, kw = int(w.shape[2]), int(w.shape[3])
    if k != 2 or groups != 1 or list(strides) != [kh, kw] or any(pads) or list(dil) != [1, 1]:
        return None
    return kh, kw


class PatchConv(Tactic):
    name = "cuda.patch_conv"
    ops = frozenset({"Conv", "Fused"})
    devices = frozenset({"cuda"})
    priority = 38

    def applicable(self, node: Node, device: torch.device) -> bool:
        a = Anchored.of(node, ANCHORS)
        return (a is not None and super().applicable(node, device) and len(node.outputs) == 1 and a.dtypes_ok()
                and _patch(a) is not None)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        a = Anchored.of(node, ANCHORS)
        assert a is not None
        found = _patch(a)
        assert found is not None
        kh, kw = found
        x_at, w_at = a.arg[0], a.arg[1]
        b_at = a.arg[2] if len(a.arg) > 2 else None
        assert x_at is not None and w_at is not None
        weight = prepared(node, w_at, ("cuda.patch_conv", "ckk_o"),
                          lambda w: w.reshape(w.shape[0], -1).t().contiguous())
        rest = tail(a, 0)

        def run(xs: list[Any]) -> list[Any]:
            x = xs[x_at]
            w = weight(xs[w_at])
            if x.dim() != 4 or x.shape[1] * kh * kw != w.shape[0]:
                raise InputError(f"cuda.patch_conv: the input is {list(x.shape)}, the weight expects "
                                 f"[N, {w.shape[0] // (kh * kw)}, H, W]")
            n, c, h, wd = x.shape
            oh, ow = h // kh, wd // kw
            if oh < 1 or ow < 1:
                raise InputError(f"cuda.patch_conv: a {h}x{wd} input is smaller than the {kh}x{kw} window")
            x = x[:, :, :oh * kh, :ow * kw]  # a remainder smaller than a window is not convolved
            cols = x.reshape(n, c, oh, kh, ow, kw).permute(0, 2, 4, 1, 3, 5).reshape(n * oh * ow, c * kh * kw)
            b = xs[b_at] if b_at is not None else None
            y = torch.addmm(b, cols, w) if b is not None else cols @ w
            y = y.view(n, oh, ow, -1).permute(0, 3, 1, 2)  # [N, O, OH, OW] in channels-last memory
            y = rest(y, xs)
            last = xs[x_at].is_contiguous(memory_format=torch.channels_last) and not xs[x_at].is_contiguous()
            return [y if last else y.contiguous()]

        return run


register(PatchConv())
