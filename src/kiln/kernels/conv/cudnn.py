"""`cuda.conv`: 1-D/2-D/3-D Conv, alone or anchoring an epilogue, through cuDNN (torch).

The conv's own bias goes to cuDNN. The epilogue after it runs as one pointwise kernel in place, or - config
`fuse="cudnn"` - through cuDNN's fused conv + bias (+ residual) + ReLU when the steps are exactly [Relu] or
[Add(residual), Relu]. The weight is kept in the memory format of the input (channels-last when the layout pass
chose it), converted once at build time, so cuDNN never transposes it per call. Config `format="nchw"` runs a
channels-last input row-major and converts the result back (inside the timed kernel, so the tuner weighs the
conversions): depthwise and other grouped convolutions have row-major kernels that can beat the channels-last
ones. Asymmetric padding is left to the reference. (Letting cuDNN time its algorithms per shape - torch's
`cudnn.benchmark` - was tried as a config: on an H100 it changed no ResNet-50 or MobileNetV3 layer by more than
noise, and doubled the build time, so it is not in the space.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.cpu.common import prepared
from kiln.kernels.epilogue import Anchored, tail
from kiln.kernels.registry import register

ANCHORS = frozenset({"Conv"})
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _params(a: Anchored) -> tuple[int, list[int], list[int], list[int], int] | None:
    """(spatial rank, strides, symmetric pads, dilations, groups), or None when torch's conv cannot express it."""
    w = a.constant(1)
    x = a.input(0)
    if w is None or x is None or x.rank is None or x.rank - 2 not in CONV or w.dim() != x.rank:
        return None
    at = a.anchor.attrs
    k = x.rank - 2
    if at.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    pads = list(at.get("pads") or [0] * (2 * k)) if at.get("auto_pad", "NOTSET") == "NOTSET" else [0] * (2 * k)
    if pads[:k] != pads[k:]:
        return None
    strides = list(at.get("strides") or [1] * k)
    dil = list(at.get("dilations") or [1] * k)
    return k, strides, pads[:k], dil, int(at.get("group", 1))


def _cudnn_fusable(a: Anchored) -> str | None:
    ops = [s.op for s in a.steps]
    if ops == ["Relu"]:
        return "relu"
    if ops == ["Add", "Relu"]:
        _, v, data = a.step_operand(0)
        if v is not None and data is None and a.body is not None and v in a.body.inputs:
            return "add_relu"
    return None


class CudnnConv(Tactic):
    name = "cuda.conv"
    ops = frozenset({"Conv", "Fused"})
    devices = frozenset({"cuda"})
    space = {"fuse": ["pointwise", "cudnn"], "format": ["given", "nchw"]}
    priority = 40

    def applicable(self, node: Node, device: torch.device) -> bool:
        a = Anchored.of(node, ANCHORS)
        return a is not None and device.type in self.devices and a.dtypes_ok() and _params(a) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        a = Anchored.of(node, ANCHORS)
        assert a is not None
        params = _params(a)
        assert params is not None
        k, strides, pads, dil, groups = params
        x_at, w_at, b_at = a.arg[0], a.arg[1], a.arg[2] if len(a.arg) > 2 else None
        assert x_at is not None and w_at is not None
        cl = prepared(node, w_at, ("cuda.conv", "channels_last"),
                      lambda w: w.contiguous(memory_format=torch.channels_last) if w.dim() == 4 else w.contiguous())
        plain = prepared(node, w_at, ("cuda.conv", "contiguous"), lambda w: w.contiguous())
        fused = _cudnn_fusable(a) if config.get("fuse") == "cudnn" and k == 2 else None
        if config.get("fuse") == "cudnn" and fused is None:
            raise ValueError("cuDNN's fused conv takes [Relu] or [Add, Relu] epilogues only")
        conv = CONV[k]
        rest = tail(a, 0)
        res_at = 0
        if fused == "add_relu":
            _, v, _ = a.step_operand(0)
            assert a.body is not None and v is not None
            res_at = a.body.inputs.index(v)

        row_major = config.get("format") == "nchw"

        def run(xs: list[Any]) -> list[Any]:
            x = xs[x_at]
            last = k == 2 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            if last and row_major:  # e.g. depthwise convs, whose row-major kernels can beat cuDNN's NHWC ones
                y = _run(x.contiguous(), plain(xs[w_at]), [v.contiguous() if isinstance(v, torch.Tensor) and
                                                           v.dim() == 4 else v for v in xs])
                return [y.contiguous(memory_format=torch.channels_last)]  # the layout its readers expect
            return [_run(x, cl(xs[w_at]) if last else plain(xs[w_at]), xs)]

        def _run(x: torch.Tensor, w: torch.Tensor, xs: list[Any]) -> torch.Tensor:
            b = None if b_at is None else xs[b_at]
            if fused == "relu":
                return torch.cudnn_convolution_relu(x, w, b, strides, pads, dil, groups)
            if fused == "add_relu":
                return torch.cudnn_convolution_add_relu(x, w, xs[res_at], 1.0, b, strides, pads, dil, groups)
            return rest(conv(x, w, b, strides, pads, dil, groups), xs)

        return run


register(CudnnConv())


class PaddedChannelsConv(CudnnConv):
    """`cuda.conv_padc`: a 2-D ungrouped conv whose input channels are not a multiple of 8 (an RGB stem), run by
    cuDNN with the input and the weight zero-padded to the next multiple of 8 channels: the same sums (the extra
    channels add zeros), but cuDNN's float16 tensor-core kernels need 8-aligned channels and fall back to slow ones
    without. The pad is one extra pass over the input; the tuner weighs it."""

    name = "cuda.conv_padc"
    priority = 42

    def applicable(self, node: Node, device: torch.device) -> bool:
        if not super().applicable(node, device):
            return False
        a = Anchored.of(node, ANCHORS)
        w = a.constant(1) if a is not None else None
        params = _params(a) if a is not None else None
        return w is not None and params is not None and params[0] == 2 and params[4] == 1 and w.shape[1] % 8 != 0

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        a = Anchored.of(node, ANCHORS)
        assert a is not None
        x_at, w_at = a.arg[0], a.arg[1]
        assert x_at is not None and w_at is not None
        w0 = a.constant(1)
        assert w0 is not None
        inner = super().build(node, config, device, run_subgraph)
        extra = -int(w0.shape[1]) % 8
        wide = prepared(node, w_at, ("cuda.conv_padc", "weight"), lambda w: F.pad(w, (0, 0, 0, 0, 0, extra)))

        def run(xs: list[Any]) -> list[Any]:
            padded = list(xs)
            padded[x_at] = F.pad(xs[x_at], (0, 0, 0, 0, 0, extra))  # keeps a channels-last input channels-last
            padded[w_at] = wide(xs[w_at])
            return inner(padded)

        return run


register(PaddedChannelsConv())
