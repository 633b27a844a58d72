"""`cuda.int8_gemm` (GPU, and CPU where the tuner finds it faster): a "quantized" Fused node (DequantizeLinear of
an int8 activation, DequantizeLinear of an int8 weight, then a MatMul or Gemm and its epilogue;
`kiln.precision.quantize.fold_quantized`) as an int8 x int8 -> int32 product (torch's `_int_mm`: cuBLASLt on GPUs),
dequantized by one multiply with the per-tensor activation scale times the per-output-channel weight scales, then
the epilogue steps in place (`kiln.kernels.epilogue.tail`).

Exactness: symmetric scales (zero points 0) make sx * sw[n] * sum_k(xq * wq) the reference's
sum_k((xq * sx) * (wq * sw[n])) up to float rounding, and the int32 sum is exact. Shapes `_int_mm` does not take
(M <= 16 rows, K or N not a multiple of 8) run the same arithmetic in float - correct, not faster.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.cpu.common import prepared
from kiln.kernels.epilogue import Anchored, tail
from kiln.kernels.registry import register


def _layout(node: Node) -> tuple[int, int, int, int, int, int, int | None] | None:
    """(node input indices of: xq, x scale, wq, w scale; weight's output-channel axis; 1 if Gemm takes W as [N, K];
    node input index of a Gemm's C or None) for a "quantized" node this tactic runs, else None."""
    if node.op != "Fused" or node.attrs.get("kind") != "quantized":
        return None
    body: Graph = node.attrs["body"]
    if len(body.nodes) < 3:
        return None
    dx, dw, anchor = body.nodes[:3]
    if dx.op != "DequantizeLinear" or dw.op != "DequantizeLinear" or anchor.op not in ("MatMul", "Gemm"):
        return None
    if anchor.inputs[0] is not dx.outputs[0] or anchor.inputs[1] is not dw.outputs[0] or len(body.outputs) != 1:
        return None
    if anchor.op == "Gemm" and (anchor.attrs.get("transA", 0) or float(anchor.attrs.get("alpha", 1.0)) != 1.0):
        return None
    c = anchor.inputs[2] if anchor.op == "Gemm" and len(anchor.inputs) > 2 else None
    if c is not None and c not in body.inputs:
        return None
    ins = body.inputs
    try:
        at = [ins.index(v) for v in (dx.inputs[0], dx.inputs[1], dw.inputs[0], dw.inputs[1])]  # type: ignore[arg-type]
    except ValueError:
        return None
    xs = [node.inputs[i] for i in at]
    if any(v is None for v in xs):
        return None
    xq, sx, wq, sw = xs
    assert xq is not None and sx is not None and wq is not None and sw is not None
    if not (_zero(node, dx) and _zero(node, dw)) or not isinstance(wq.data, torch.Tensor) or wq.data.dim() != 2:
        return None
    if not (isinstance(sx.data, torch.Tensor) and sx.data.numel() == 1 and isinstance(sw.data, torch.Tensor)):
        return None
    trans_b = int(anchor.op == "Gemm" and anchor.attrs.get("transB", 0))
    axis = int(dw.attrs.get("axis", 1)) % 2
    if axis != (0 if trans_b else 1) or sw.data.numel() != wq.data.shape[axis]:
        return None  # scales per output channel only
    if not isinstance(xq.type, TensorType) or xq.type.dtype is not DType.INT8 or xq.rank is None or xq.rank < 2:
        return None
    if anchor.op == "Gemm" and xq.rank != 2:
        return None
    out = body.outputs[0]
    if not isinstance(out.type, TensorType) or out.type.dtype is not DType.FLOAT32:
        return None
    return at[0], at[1], at[2], at[3], axis, trans_b, None if c is None else ins.index(c)


def _zero(node: Node, dq: Node) -> bool:
    """Whether DequantizeLinear `dq`'s zero point is absent or a constant of zeros."""
    body: Graph = node.attrs["body"]
    zp: Value | None = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zp is None:
        return True
    outer = node.inputs[body.inputs.index(zp)] if zp in body.inputs else zp
    return outer is not None and isinstance(outer.data, torch.Tensor) and not bool(outer.data.any())


class Int8Gemm(Tactic):
    name = "cuda.int8_gemm"
    ops = frozenset({"Fused"})
    devices = frozenset({"cuda", "cpu"})  # torch's _int_mm has a CPU kernel too: the tuner decides there
    priority = 30

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and _layout(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        found = _layout(node)
        assert found is not None
        xq_at, sx_at, wq_at, sw_at, _, trans_b, c_at = found
        body: Graph = node.attrs["body"]
        anchor = body.nodes[2]
        beta = float(anchor.attrs.get("beta", 1.0)) if anchor.op == "Gemm" else 0.0
        # the epilogue after the anchor, run on the dequantized product as on any anchor's output
        rest = tail(Anchored(node, anchor, [], body.nodes[3:], body), 0)
        # why: _int_mm multiplies a row-major [M, K] by a column-major [K, N]; the weight is laid out so once
        w_kn = prepared(node, wq_at, ("cuda.int8_gemm", "kn_colmajor"),
                        lambda w: (w if trans_b else w.t()).contiguous().t())
        scale = prepared(node, sw_at, ("cuda.int8_gemm", "row"), lambda s: s.float().reshape(1, -1))

        def run(xs: list[Any]) -> list[Any]:
            xq = xs[xq_at]
            w = w_kn(xs[wq_at])
            k, n = w.shape
            lead = xq.shape[:-1]
            m = math.prod(lead)
            x2 = xq.reshape(m, k)
            dequant = xs[sx_at].float() * scale(xs[sw_at])  # [1, N]
            if m > 16 and k % 8 == 0 and n % 8 == 0:
                acc = torch._int_mm(x2.contiguous(), w).float()
            else:  # shapes cuBLASLt's int8 GEMM refuses: the same product in float (int8 values are exact there)
                acc = x2.float() @ w.float()
            y = acc * dequant
            if c_at is not None:
                y = y + beta * xs[c_at].float()
            return [rest(y.reshape(*lead, n), xs)]

        return run


register(Int8Gemm())
