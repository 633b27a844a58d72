"""Op table entry: `Fused`, the one op kind every fusion pass produces.

A fused node carries its computation as data: a `body` graph of ordinary ops (the nodes it replaced), reading only
the fused node's inputs. `kind` tells the code generators which template applies:

- "epilogue": an anchor (Conv, ConvTranspose, Gemm, MatMul) followed by elementwise ops on its output (bias, an
  activation, a residual Add, a cast) - rendered by one GEMM/conv template with the epilogue list;
- "pointwise": a DAG of elementwise ops (with broadcasts and casts) - generated as one kernel;
- "quantized": DequantizeLinear of an int8 activation, DequantizeLinear of an int8 weight, then an anchor (Gemm,
  MatMul, Conv) and its epilogue steps - an int8 x int8 -> int32 product with the dequantization and the epilogue
  after it (`kiln.precision.quantize.fold_quantized`);
- "quantizing": an op whose kernel can quantize its own result (LayerNormalization, RMSNormalization, Attention)
  and the QuantizeLinear of that result - one kernel that writes the 8-bit values for the next layer (and the float
  result too, when something else reads it) (`kiln.precision.quantize.fuse_output_quantize`);
- "normalized": a LayerNormalization or RMSNormalization over the last axis, then an anchor (MatMul, Gemm) reading
  its result as A, and the anchor's epilogue steps - a GEMM that normalizes A's rows as it loads them; outputs
  [result] or [the norm's result, result] (`kiln.passes.fuse_norm_gemm`);
- "residual_norm": the Add of a residual and the LayerNormalization or RMSNormalization of the sum - one norm kernel
  that reads both addends (`kiln.passes.residual_norm`); outputs [the norm's result];
- "scaled": a Mul of an activation [N, C, H, W] by a per-(image, channel) scale [N or 1, C, 1, 1], then a 1x1 Conv
  reading the product and its epilogue steps - a conv that scales its input tiles as it loads them
  (`kiln.passes.channel_scale`);
- "embedding": lookups (Gather along axis 0 of constant tables by runtime indices) and other terms summed by Adds,
  then a LayerNormalization of the sum - one kernel, a program per token (`kiln.passes.fuse_embeddings`);
- "region": anything else grouped for scheduling.

The reference runs the body node by node through the op table, so every fused node is correct by construction.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import ValueType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register, run_nodes, value_of

KINDS = ("epilogue", "pointwise", "quantized", "quantizing", "normalized", "residual_norm", "scaled", "embedding",
         "region")


def _infer(ctx: InferCtx) -> list[ValueType]:
    body = ctx.attrs["body"]
    if len(body.inputs) != ctx.n_inputs:
        raise ctx.error(f"the body takes {len(body.inputs)} inputs, the node has {ctx.n_inputs}")
    return [v.type for v in body.outputs]


def _ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    body = c.attrs["body"]
    device = next((x.device for x in xs if isinstance(x, torch.Tensor)), None)
    env = run_nodes(body.nodes, dict(zip(body.inputs, xs)), device)
    return [value_of(v, env, device) for v in body.outputs]


register(
    "Fused", inputs=["inputs*"], outputs=["outputs+"], infer=_infer, ref=_ref,
    attrs={"body": Attr(AttrKind.GRAPH), "kind": Attr(AttrKind.STRING, "region", choices=KINDS)},
    doc="Nodes fused into one step; the body graph is the computation (see the module docstring).",
)
