"""`cuda.int8_gemm` (GPU, and CPU where the tuner finds it faster): a "quantized" Fused node (DequantizeLinear of
an int8 activation, DequantizeLinear of an int8 weight, then a MatMul or Gemm and its epilogue;
`kiln.precision.quantize.fold_quantized`) as an int8 x int8 -> int32 product (torch's `_int_mm`: cuBLASLt on GPUs),
dequantized by one multiply with the per-tensor activation scale times the per-output-channel weight scales, then
the epilogue steps in place (`kiln.kernels.epilogue.tail`).

The product's dtype is the layer's: float32, or float16/bfloat16 when the build lowered the float parts (the
dequantization runs in float32 and is rounded once). Exactness: symmetric scales (zero points 0) make
sx * sw[n] * sum_k(xq * wq) the reference's sum_k((xq * sx) * (wq * sw[n])) up to float rounding, and the int32 sum
is exact. Shapes `_int_mm` does not take (M <= 16 rows, K or N not a multiple of 8) run the same arithmetic in
float - correct, not faster.
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

FLOATS = {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}


def quantized_layout(node: Node, dtype: DType = DType.INT8) -> tuple[int, int, int, int, int, int, int | None] | None:
    """(node input indices of: xq, x scale, wq, w scale; weight's output-channel axis; 1 if Gemm takes W as [N, K];
    node input index of a Gemm's C or None) for a "quantized" MatMul/Gemm node of `dtype`, else None: int8 with
    per-output-channel weight scales, or float8 E4M3 with one weight scale (what FP8 GEMMs take); one activation
    scale, zero points 0."""
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
    if not (zero_points_zero(node, dx) and zero_points_zero(node, dw)):
        return None
    if not isinstance(wq.data, torch.Tensor) or wq.data.dim() != 2 or wq.data.dtype != dtype.torch:
        return None
    if not (isinstance(sx.data, torch.Tensor) and sx.data.numel() == 1 and isinstance(sw.data, torch.Tensor)):
        return None
    trans_b = int(anchor.op == "Gemm" and anchor.attrs.get("transB", 0))
    axis = int(dw.attrs.get("axis", 1)) % 2
    if dtype is DType.INT8 and (axis != (0 if trans_b else 1) or sw.data.numel() != wq.data.shape[axis]):
        return None  # int8: scales per output channel only
    if dtype is not DType.INT8 and sw.data.numel() != 1:
        return None  # float8: one scale, as _scaled_mm's tensor-wise scaling takes
    if not isinstance(xq.type, TensorType) or xq.type.dtype is not dtype or xq.rank is None or xq.rank < 2:
        return None
    if anchor.op == "Gemm" and xq.rank != 2:
        return None
    out = anchor.outputs[0]
    if not isinstance(out.type, TensorType) or out.type.dtype not in FLOATS:
        return None
    return at[0], at[1], at[2], at[3], axis, trans_b, None if c is None else ins.index(c)


def zero_points_zero(node: Node, dq: Node) -> bool:
    """Whether DequantizeLinear `dq`'s zero point is absent or a constant of zeros."""
    body: Graph = node.attrs["body"]
    zp: Value | None = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zp is None:
        return True
    outer = node.inputs[body.inputs.index(zp)] if zp in body.inputs else zp
    return outer is not None and isinstance(outer.data, torch.Tensor) and not bool((outer.data.float() != 0).any())


class Int8Gemm(Tactic):
    name = "cuda.int8_gemm"
    ops = frozenset({"Fused"})
    devices = frozenset({"cuda", "cpu"})  # torch's _int_mm has a CPU kernel too: the tuner decides there
    priority = 30

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and quantized_layout(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        found = quantized_layout(node)
        assert found is not None
        xq_at, sx_at, wq_at, sw_at, _, trans_b, c_at = found
        body: Graph = node.attrs["body"]
        anchor = body.nodes[2]
        beta = float(anchor.attrs.get("beta", 1.0)) if anchor.op == "Gemm" else 0.0
        out_dtype = FLOATS[anchor.outputs[0].dtype]  # float32, or float16/bfloat16 in a lowered build
        # the epilogue after the anchor, run on the dequantized product as on any anchor's output
        rest = tail(Anchored(node, anchor, [], body.nodes[3:], body), 0)
        # why: _int_mm multiplies a row-major [M, K] by a column-major [K, N]; the weight is laid out so once
        w_kn = prepared(node, wq_at, ("cuda.int8_gemm", "kn_colmajor"),
                        lambda w: (w if trans_b else w.t()).contiguous().t())
        sx = node.inputs[sx_at]
        assert sx is not None and isinstance(sx.data, torch.Tensor)  # _layout checked: a constant per-tensor scale
        sx_value = float(sx.data.float().reshape(()))
        # the activation's scale times each output channel's weight scale: one [1, N] row, made once
        dequant_row = prepared(node, sw_at, ("cuda.int8_gemm", "dequant", sx_value),
                               lambda s: s.float().reshape(1, -1) * sx_value)

        def run(xs: list[Any]) -> list[Any]:
            xq = xs[xq_at]
            w = w_kn(xs[wq_at])
            k, n = w.shape
            lead = xq.shape[:-1]
            m = math.prod(lead)
            x2 = xq.reshape(m, k)
            dequant = dequant_row(xs[sw_at])  # [1, N]
            if m > 16 and k % 8 == 0 and n % 8 == 0:
                acc = torch._int_mm(x2.contiguous(), w).float()
            else:  # shapes cuBLASLt's int8 GEMM refuses: the same product in float (int8 values are exact there)
                acc = x2.float() @ w.float()
            y = acc * dequant
            if c_at is not None:
                y = y + beta * xs[c_at].float()
            return [rest(y.to(out_dtype).reshape(*lead, n), xs)]  # rounded once, after the float32 dequantization

        return run


register(Int8Gemm())


# --- MatMulInteger ------------------------------------------------------------------------------------------------


def _matmul_integer(node: Node) -> bool:
    """MatMulInteger of an int8/uint8 activation [..., K] (per-tensor zero point, any) by a constant int8 [K, N]
    weight with zero zero points: what dynamic quantization (onnxruntime's quantize_dynamic) produces."""
    if node.op != "MatMulInteger" or len(node.outputs) != 1:
        return False
    a, b = node.inputs[0], node.inputs[1]
    za = node.inputs[2] if len(node.inputs) > 2 else None
    zb = node.inputs[3] if len(node.inputs) > 3 else None
    if a is None or b is None or not isinstance(a.type, TensorType) or a.type.dtype not in (DType.INT8, DType.UINT8):
        return False
    if a.rank is None or a.rank < 2 or not isinstance(b.data, torch.Tensor) or b.data.dtype != torch.int8 \
            or b.data.dim() != 2:
        return False
    if za is not None and (not isinstance(za.type, TensorType) or za.rank not in (0, 1)
                           or (za.shape is not None and za.rank == 1 and za.shape[0] != 1)):
        return False
    return zb is None or (isinstance(zb.data, torch.Tensor) and not bool(zb.data.any()))


def centered_product(a: torch.Tensor, za: torch.Tensor | None, w: torch.Tensor, colsum: torch.Tensor) -> torch.Tensor:
    """(a - za) @ w in int32, exactly: `a` int8/uint8 [..., K], `za` its per-tensor zero point (or None), `w` int8
    [K, N] (column-major for _int_mm), `colsum` w's column sums [1, N] in int32. A uint8 `a` is shifted to int8
    (a - 128) and the shift returns as (128 - za) x colsum."""
    k, n = w.shape
    lead = a.shape[:-1]
    m = math.prod(lead)
    a2 = a.reshape(m, k)
    shift = torch.zeros((), dtype=torch.int32, device=a.device)
    if a.dtype == torch.uint8:
        a2 = (a2.to(torch.int16) - 128).to(torch.int8)
        shift = shift + 128
    if za is not None:
        shift = shift - za.reshape(()).to(torch.int32)
    if m > 16 and k % 8 == 0 and n % 8 == 0:
        acc = torch._int_mm(a2.contiguous(), w)
    else:  # shapes _int_mm refuses: exact in float64 while |sum| < 2**53 (K < 2**38 for 8-bit operands)
        acc = (a2.double() @ w.double()).to(torch.int32)
    return (acc + shift * colsum).reshape(*lead, n)


def _int8_weight(node: Node, at: int, zero_at: int | None) -> bool:
    """Input `at` is a constant int8 2-D weight whose zero point (input `zero_at`) is absent or all zeros."""
    b = node.inputs[at] if at < len(node.inputs) else None
    zb = node.inputs[zero_at] if zero_at is not None and zero_at < len(node.inputs) else None
    if b is None or not isinstance(b.data, torch.Tensor) or b.data.dtype != torch.int8 or b.data.dim() != 2:
        return False
    return zb is None or (isinstance(zb.data, torch.Tensor) and not bool(zb.data.any()))


def _per_tensor(v: Value | None) -> bool:
    return v is None or (isinstance(v.type, TensorType) and v.shape is not None and all(d == 1 for d in v.shape))


def _8bit(v: Value | None) -> bool:
    return v is not None and isinstance(v.type, TensorType) and v.type.dtype in (DType.INT8, DType.UINT8)


class MatMulIntegerTactic(Tactic):
    """MatMulInteger and QLinearMatMul of an int8/uint8 activation (per-tensor zero point) by a constant int8 weight
    (zero zero points) on `_int_mm` (`centered_product`): results equal the references' exactly (QLinearMatMul
    requantizes in float64 with the reference's own factor)."""

    name = "cuda.matmul_integer"
    ops = frozenset({"MatMulInteger", "QLinearMatMul"})
    devices = frozenset({"cuda", "cpu"})
    priority = 30

    def applicable(self, node: Node, device: torch.device) -> bool:
        if not super().applicable(node, device) or len(node.outputs) != 1:
            return False
        ins = node.inputs + [None] * (8 - len(node.inputs))
        a = ins[0]
        if not _8bit(a) or a is None or a.rank is None or a.rank < 2:
            return False
        if node.op == "MatMulInteger":
            return _int8_weight(node, 1, 3) and _per_tensor(ins[2])
        b_scale = ins[4]
        return (_int8_weight(node, 3, 5) and all(_per_tensor(v) for v in (ins[1], ins[2], ins[6], ins[7]))
                and _8bit(ins[7]) and b_scale is not None and b_scale.rank in (0, 1))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        qlinear = node.op == "QLinearMatMul"
        w_at, za_at = (3, 2) if qlinear else (1, 2)
        w_kn = prepared(node, w_at, ("cuda.matmul_integer", "kn_colmajor"), lambda w: w.t().contiguous().t())
        colsum = prepared(node, w_at, ("cuda.matmul_integer", "colsum"),
                          lambda w: w.sum(0, keepdim=True, dtype=torch.int32))

        def run(xs: list[Any]) -> list[Any]:
            xs = xs + [None] * (8 - len(xs))
            acc = centered_product(xs[0], xs[za_at], w_kn(xs[w_at]), colsum(xs[w_at]))
            if not qlinear:
                return [acc]
            a_scale, b_scale, y_scale, y_zero = xs[1], xs[4], xs[6], xs[7]
            factor = a_scale.reshape(()) * b_scale / y_scale.reshape(())  # in the scales' dtype, as the reference
            y = acc.to(torch.float64) * factor.to(torch.float64) + y_zero.reshape(()).to(torch.float64)
            info = torch.iinfo(y_zero.dtype)
            return [torch.round(y).clamp(info.min, info.max).to(y_zero.dtype)]

        return run


register(MatMulIntegerTactic())
