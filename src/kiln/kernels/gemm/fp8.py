"""FP8 (float8 E4M3) tactics for `precision="fp8"` builds (`kiln.precision.quantize.quantize_graph(fp8=True)`).

- `cuda.fp8_gemm`: a "quantized" Fused node whose activation and weight are float8 E4M3 with one scale each (the
  body: two DequantizeLinear, a MatMul or Gemm, its epilogue) as torch's `_scaled_mm` - cuBLASLt's FP8 GEMM on
  sm_89+ GPUs (float32 accumulation, the two scales and a bias applied in its epilogue, one rounding to the
  layer's dtype), torch's own kernel on CPUs - then the rest of the epilogue (`kiln.kernels.epilogue.tail`).
  `_scaled_mm` wants K and N in multiples of 16; other shapes run the same arithmetic in float32.
- `triton.fp8_quantize`: a QuantizeLinear to float8 E4M3 (per tensor) as one Triton pass: x / scale (rounded to the
  scale's type, as the reference divides), saturated to +-448 (NaN stays NaN), converted with the GPU's
  round-to-nearest-even float8 conversion - what the op table's reference computes. GPU-tested only: the Triton
  interpreter's float8 conversion is wrong.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.cpu.common import prepared
from kiln.kernels.epilogue import Anchored, tail
from kiln.kernels.gemm.cublas import _bias_step
from kiln.kernels.gemm.int8 import FLOATS, quantized_layout
from kiln.kernels.registry import register

FP8 = DType.FLOAT8_E4M3FN
FP8_MAX = 448.0


def fp8_layout(node: Node) -> tuple[int, int, int, int, bool, int | None] | None:
    """(node input indices of: fp8 activation, its scale, fp8 weight, its scale; whether a Gemm takes W as [N, K];
    node input index of a Gemm's C or None) for a "quantized" FP8 MatMul/Gemm node, else None."""
    found = quantized_layout(node, FP8)
    if found is None:
        return None
    xq_at, sx_at, wq_at, sw_at, _, trans_b, c_at = found
    return xq_at, sx_at, wq_at, sw_at, bool(trans_b), c_at


class Fp8Gemm(Tactic):
    name = "cuda.fp8_gemm"
    ops = frozenset({"Fused"})
    devices = frozenset({"cuda", "cpu"})  # torch's _scaled_mm has a CPU kernel: correct there, not fast
    priority = 30

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and fp8_layout(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        found = fp8_layout(node)
        assert found is not None
        xq_at, sx_at, wq_at, sw_at, trans_b, c_at = found
        body: Graph = node.attrs["body"]
        anchor = body.nodes[2]
        beta = float(anchor.attrs.get("beta", 1.0)) if anchor.op == "Gemm" else 0.0
        out_dtype = FLOATS[anchor.outputs[0].dtype]
        w_data = node.inputs[wq_at].data  # type: ignore[union-attr]
        assert isinstance(w_data, torch.Tensor)
        n = int(w_data.shape[0] if trans_b else w_data.shape[1])
        a = Anchored(node, anchor, [xq_at, wq_at, c_at], body.nodes[3:], body)
        absorbed, bias_at = (0, None)
        if c_at is None and out_dtype in (torch.float16, torch.bfloat16):  # cuBLASLt adds a bias of the output type
            absorbed, bias_at = _bias_step(a, n)
        rest = tail(a, absorbed)
        # why: _scaled_mm multiplies a row-major [M, K] by a column-major [K, N]; the weight is laid out so once
        w_kn = prepared(node, wq_at, ("cuda.fp8_gemm", "kn_colmajor"),
                        lambda w: (w if trans_b else w.t()).contiguous().t())
        scales = [float(node.inputs[i].data.float().reshape(())) for i in (sx_at, sw_at)]  # type: ignore[union-attr]
        on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def run(xs: list[Any]) -> list[Any]:
            xq = xs[xq_at]
            w = w_kn(xs[wq_at])
            k = w.shape[0]
            lead = xq.shape[:-1]
            m = math.prod(lead)
            x2 = xq.reshape(m, k)
            sa, sb = on.get(xq.device) or on.setdefault(
                xq.device, tuple(torch.tensor(s, dtype=torch.float32, device=xq.device) for s in scales))  # type: ignore[arg-type]
            bias = None if bias_at is None else xs[bias_at].reshape(-1).to(out_dtype)
            if k % 16 == 0 and n % 16 == 0 and m > 0:
                y = torch._scaled_mm(x2.contiguous(), w, scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype)
            else:  # shapes FP8 GEMMs refuse: the same product in float32 (float8 values are exact there)
                y32 = (x2.float() @ w.float()) * (sa * sb)
                y = (y32 if bias is None else y32 + bias.float()).to(out_dtype)
            if c_at is not None:
                y = (y.float() + beta * xs[c_at].float()).to(out_dtype)
            return [rest(y.reshape(*lead, n), xs)]

        return run


register(Fp8Gemm())


# --- QuantizeLinear to float8 ----------------------------------------------------------------------------------

_QUANTIZE_SOURCE = '''"""Generated by kiln.kernels.gemm.fp8 (QuantizeLinear to float8 E4M3)."""
import triton
import triton.language as tl


@triton.jit
def kiln_fp8_quantize(x_ptr, s_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    q = (x.to(tl.float32) / tl.load(s_ptr).to(tl.float32)){round}
    q = tl.where(q != q, q, tl.minimum(tl.maximum(q, -448.0), 448.0))
    tl.store(y_ptr + offs, q.to(tl.float8e4nv), mask=ok)
'''


def _fp8_quantize(node: Node) -> bool:
    """QuantizeLinear of a float16/bfloat16/float32 tensor to float8 E4M3 with one scale and a zero point of 0."""
    if node.op != "QuantizeLinear" or len(node.inputs) < 2 or len(node.outputs) != 1:
        return False
    x, s = node.inputs[0], node.inputs[1]
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    out = node.outputs[0]
    if x is None or s is None or not isinstance(out.type, TensorType) or out.type.dtype is not FP8:
        return False
    if not isinstance(x.type, TensorType) or x.type.dtype not in FLOATS or int(node.attrs.get("saturate", 1)) != 1:
        return False
    if s.shape is None or any(d != 1 for d in s.shape) or node.attrs.get("precision") not in (None, 0):
        return False
    if s.type.dtype not in FLOATS:  # type: ignore[union-attr]
        return False
    return zp is None or (isinstance(zp.data, torch.Tensor) and not bool((zp.data.float() != 0).any()))


class Fp8Quantize(Tactic):
    name = "triton.fp8_quantize"
    ops = frozenset({"QuantizeLinear"})
    devices = frozenset({"cuda"})
    priority = 30

    def applicable(self, node: Node, device: torch.device) -> bool:
        from kiln.kernels.pointwise import triton_available

        return super().applicable(node, device) and triton_available() and _fp8_quantize(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        import triton

        from kiln.kernels.pointwise.tile import load_function

        # why: the reference divides in the scale's type; a float32 quotient of two float16 values rounded once to
        # float16 is that exactly rounded quotient, and only then is it rounded to float8
        scale = node.inputs[1]
        assert scale is not None
        narrow = {DType.FLOAT16: "tl.float16", DType.BFLOAT16: "tl.bfloat16"}.get(scale.dtype)
        text = _QUANTIZE_SOURCE.format(round=f".to({narrow}).to(tl.float32)" if narrow else "")
        fn = load_function(text, "kiln_fp8_quantize", "kiln_fp8_quantize")
        block = 1024

        def run(xs: list[Any]) -> list[Any]:
            x, s = xs[0], xs[1]
            if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
                x = x.contiguous()
            y = torch.empty_like(x, dtype=torch.float8_e4m3fn)  # same memory order: the flat walk matches
            n = x.numel()
            if n:
                fn[(triton.cdiv(n, block),)](x, s.reshape(1), y, n, BLOCK=block)
            return [y]

        return run


register(Fp8Quantize())
