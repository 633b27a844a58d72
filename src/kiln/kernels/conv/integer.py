"""`cuda.conv_integer`: ConvInteger and QLinearConv (models quantized before import, onnxruntime's QOperator
format) on int8 x int8 -> int32 products instead of the reference's float64 convolution.

The convolution runs as one GEMM over its patches: the input padded with its own zero point (so a padded position
contributes (x_zero - x_zero) * w = 0, as the reference pads after the shift), unfolded into rows of C*kh*kw
patch elements, times the weight seen as [C*kh*kw, M], through `centered_product` (torch's `_int_mm`: cuBLASLt on
GPUs; a uint8 input is shifted to int8 and the shift added back through the weight's column sums). The int32
sums are exact, so ConvInteger's result is the reference's bit for bit; QLinearConv adds its int32 bias and
requantizes in float64 with the reference's own factor (x_scale * w_scale / y_scale formed in float32), so its
result is the reference's too.

Takes 2-D convolutions with one group, a constant int8 weight with zero points absent or all zero (per tensor or
per output channel), and constant per-tensor activation scale and zero points (QLinearConv's w_scale per tensor or
per output channel). Others stay with the reference. The patch matrix is materialized (C*kh*kw bytes per output
position): memory, not exactness, is its cost.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, TensorType, Value
from kiln.ir.ops.conv import Window, pad_nd
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.cpu.common import prepared
from kiln.kernels.gemm.int8 import centered_product
from kiln.kernels.registry import register
from kiln.utils.errors import ExecutionError

EIGHT_BIT = (DType.INT8, DType.UINT8)


def _constant(v: Value | None, numel: tuple[int, ...] = (1,)) -> bool:
    """A constant (an initializer) with one of the allowed element counts."""
    return v is not None and isinstance(v.data, torch.Tensor) and v.data.numel() in numel


def _zero_or_absent(v: Value | None) -> bool:
    return v is None or (isinstance(v.data, torch.Tensor) and not bool(v.data.any()))


def _layout(node: Node) -> tuple[int, int | None, int, int | None] | None:
    """(node input index of x, of x's zero point, of the weight, of the weight's zero point) for a node this tactic
    takes, else None."""
    qlinear = node.op == "QLinearConv"
    ins = node.inputs + [None] * (9 - len(node.inputs))
    x_at, xz_at, w_at, wz_at = (0, 2, 3, 5) if qlinear else (0, 2, 1, 3)
    x, xz, w, wz = ins[x_at], ins[xz_at], ins[w_at], ins[wz_at]
    if len(node.outputs) != 1 or x is None or not isinstance(x.type, TensorType) or x.type.dtype not in EIGHT_BIT \
            or x.rank != 4 or int(node.attrs.get("group", 1)) != 1:
        return None
    if w is None or not isinstance(w.data, torch.Tensor) or w.data.dtype != torch.int8 or w.data.dim() != 4:
        return None
    if not _zero_or_absent(wz) or (xz is not None and not _constant(xz)):
        return None
    if qlinear:
        m = int(w.data.shape[0])
        if not (_constant(ins[1]) and _constant(ins[6]) and _constant(ins[7]) and _constant(ins[4], (1, m))):
            return None
        y_zero = ins[7]
        if y_zero is None or not isinstance(y_zero.type, TensorType) or y_zero.type.dtype not in EIGHT_BIT:
            return None
        b = ins[8]
        if b is not None and not _constant(b, (m,)):
            return None
    return x_at, (xz_at if xz is not None else None), w_at, (wz_at if wz is not None else None)


def patches(x: torch.Tensor, kernel: tuple[int, int], strides: list[int], dilations: list[int]) -> torch.Tensor:
    """The padded input [N, C, H, W] as rows of patches [N * OH * OW, C * kh * kw] (any dtype; one copy)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oh = (h - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    ow = (w - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    sn, sc, sh, sw = x.stride()
    view = x.as_strided((n, oh, ow, c, kh, kw),
                        (sn, strides[0] * sh, strides[1] * sw, sc, dilations[0] * sh, dilations[1] * sw))
    return view.reshape(n * oh * ow, c * kh * kw)


class ConvIntegerTactic(Tactic):
    """ConvInteger and QLinearConv as an exact int8 GEMM over the input's patches (see the module docstring)."""

    name = "cuda.conv_integer"
    ops = frozenset({"ConvInteger", "QLinearConv"})
    devices = frozenset({"cuda", "cpu"})
    priority = 30

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and _layout(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        found = _layout(node)
        assert found is not None
        x_at, xz_at, w_at, _ = found
        qlinear = node.op == "QLinearConv"
        w_value = node.inputs[w_at]
        assert w_value is not None and isinstance(w_value.data, torch.Tensor)
        m, c, kh, kw = (int(d) for d in w_value.data.shape)
        window = Window(node.attrs, 2, [kh, kw], lambda msg: ExecutionError(f"node '{node.name}': {msg}"))
        w_kn = prepared(node, w_at, ("cuda.conv_integer", "kn_colmajor"),
                        lambda w: w.reshape(m, -1).contiguous().t())  # [K, M], column-major as _int_mm takes it
        colsum = prepared(node, w_at, ("cuda.conv_integer", "colsum"),
                          lambda w: w.reshape(m, -1).sum(1, dtype=torch.int32).reshape(1, m))
        zero = node.inputs[xz_at] if xz_at is not None else None
        pad_value = int(zero.data.reshape(())) if zero is not None and isinstance(zero.data, torch.Tensor) else 0

        def run(xs: list[Any]) -> list[Any]:
            x = xs[x_at]
            if x.dim() != 4 or x.shape[1] != c:
                raise ExecutionError(f"node '{node.name}' ({node.op}): input is {list(x.shape)}, the weight "
                                     f"expects [N, {c}, H, W]")
            pads = window.runtime_pads(list(x.shape[2:]))
            # why: pad with the zero point, not 0, so padded positions vanish after the shift as in the reference
            xp = pad_nd(x, pads, value=pad_value).contiguous()
            rows = patches(xp, (kh, kw), window.strides, window.dilations)
            za = xs[xz_at] if xz_at is not None else None
            acc = centered_product(rows, za, w_kn(xs[w_at]), colsum(xs[w_at]))  # [N*OH*OW, M] int32
            n = x.shape[0]
            oh = (xp.shape[2] - (kh - 1) * window.dilations[0] - 1) // window.strides[0] + 1
            ow = (xp.shape[3] - (kw - 1) * window.dilations[1] - 1) // window.strides[1] + 1
            acc = acc.reshape(n, oh, ow, m)
            if not qlinear:
                return [acc.permute(0, 3, 1, 2).contiguous()]
            xs = xs + [None] * (9 - len(xs))
            x_scale, w_scale, y_scale, y_zero, bias = xs[1], xs[4], xs[6], xs[7], xs[8]
            total = acc.to(torch.float64)
            if bias is not None:
                total = total + bias.reshape(m).to(torch.float64)
            f32 = [t.to(torch.float32).reshape(-1) for t in (x_scale, w_scale, y_scale)]
            factor = (f32[0] * f32[1] / f32[2]).to(torch.float64)  # formed in float32, as the reference does
            y = torch.round(total * factor) + y_zero.reshape(()).to(torch.float64)
            info = torch.iinfo(y_zero.dtype)
            return [y.clamp(info.min, info.max).to(y_zero.dtype).permute(0, 3, 1, 2).contiguous()]

        return run


register(ConvIntegerTactic())
