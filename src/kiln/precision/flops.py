"""Where an engine's arithmetic runs, by precision: the floating-point operations of its matrix products
(MatMul, Gemm, Conv, ConvTranspose, Attention; inside Fused bodies too) at one profile's opt shapes, summed per
precision, for `kiln build`'s precision mix. Elementwise work, norms and pooling are left out: next to the
products they are noise in FLOPs (not in time).

A product's precision is the dtype of its first input, or "int8" ("fp8") when that input is dequantized from int8
(float8 E4M3) - a DequantizeLinear of such a tensor feeds it - as an int8 (fp8) build's quantized layers are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value

PRODUCTS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention"})


def bindings(graph: Graph, opt: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Symbol -> value from the graph inputs' declared dims and the given input shapes."""
    out: dict[str, int] = {}
    for v in graph.inputs:
        shape = opt.get(v.name)
        if shape is None or not isinstance(v.type, TensorType) or v.type.shape is None:
            continue
        for d, n in zip(v.type.shape, shape):
            if isinstance(d, str) and d not in out:
                out[d] = int(n)
    return out


def _dims(v: Value | None, binds: dict[str, int]) -> list[int] | None:
    if v is None or not isinstance(v.type, TensorType) or v.type.shape is None:
        return None
    try:
        return [sym.evaluate(d, binds) for d in v.type.shape]
    except (KeyError, TypeError, ValueError):
        return None


def product_flops(node: Node, binds: dict[str, int]) -> int | None:
    """2 x the multiply-adds of one product node; None when its shapes are not known."""
    out = _dims(node.outputs[0] if node.outputs else None, binds)
    a = _dims(node.inputs[0] if node.inputs else None, binds)
    if out is None or a is None or not a:
        return None
    if node.op == "MatMul":
        return 2 * math.prod(out) * a[-1]
    if node.op == "Gemm":
        inner = a[0] if node.attrs.get("transA", 0) else a[-1]
        return 2 * math.prod(out) * inner
    if node.op in ("Conv", "ConvTranspose"):
        w = _dims(node.inputs[1], binds)
        if w is None or len(w) < 3:
            return None
        taps = math.prod(w[2:])
        if node.op == "Conv":  # w: [O, C/group, k...]
            return 2 * math.prod(out) * w[1] * taps
        return 2 * math.prod(a) * w[1] * taps  # ConvTranspose, w: [C, O/group, k...]: every input scatters
    if node.op == "Attention":
        key = _dims(node.inputs[1], binds)
        if key is None or len(a) != len(key):
            return None
        if len(a) == 4:  # [B, H, S, D]: QK^T and PV
            return 4 * a[0] * a[1] * a[2] * key[2] * a[3]
        return 4 * a[0] * a[1] * key[1] * a[2]  # packed [B, S, H*D]: heads cancel out of the count
    return None


def _label(node: Node, producers: Mapping[Value, Node]) -> str:
    x = node.inputs[0]
    src = producers.get(x) if x is not None else None
    q = src.inputs[0] if src is not None and src.op == "DequantizeLinear" and src.inputs else None
    if q is not None and isinstance(q.type, TensorType) and q.type.dtype in (DType.INT8, DType.UINT8):
        return "int8"
    if q is not None and isinstance(q.type, TensorType) and q.type.dtype is DType.FLOAT8_E4M3FN:
        return "fp8"
    return str(x.type.dtype) if x is not None and isinstance(x.type, TensorType) else "other"


def flop_mix(graph: Graph, opt: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """{"by_precision": {precision: flops}, "unknown": products whose shapes were not known} over every product
    of `graph` (Fused bodies included) at the input shapes `opt`."""
    binds = bindings(graph, opt)
    by: dict[str, int] = {}
    unknown = 0

    def walk(g: Graph, producers: dict[Value, Node]) -> None:
        nonlocal unknown
        for n in g.nodes:
            for o in n.outputs:
                producers[o] = n
        for n in g.nodes:
            body = n.attrs.get("body") if n.op == "Fused" else None
            if isinstance(body, Graph):
                inner = dict(producers)  # a body input stands for the Fused node's input
                for bv, ov in zip(body.inputs, n.inputs):
                    if ov is not None and ov in producers:
                        inner[bv] = producers[ov]
                walk(body, inner)
            elif n.op in PRODUCTS:
                f = product_flops(n, binds)
                if f is None:
                    unknown += 1
                else:
                    label = _label(n, producers)
                    by[label] = by.get(label, 0) + f

    walk(graph, {})
    return {"by_precision": by, "unknown": unknown}
