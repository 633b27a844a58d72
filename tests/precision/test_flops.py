"""The FLOP count behind `kiln build`'s precision mix: products counted exactly at a profile's opt shapes, inside
Fused bodies too, labelled by the precision they compute in (int8 when fed by a dequantized int8 tensor)."""

from __future__ import annotations

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.precision.flops import flop_mix, product_flops


def test_counts_each_product_at_the_opt_shapes() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", 3, 16, 16)))
    w = g.add_initializer("w", torch.ones(8, 3, 3, 3))
    c = g.add("Conv", [x, w], {"pads": (1, 1, 1, 1)}, name="conv")[0]
    f = g.add("Flatten", [c], {}, name="flat")[0]
    m = g.add("MatMul", [f, g.add_initializer("w2", torch.ones(8 * 16 * 16, 10))], name="fc")[0]
    q = g.add_input("q", TensorType(DType.FLOAT16, ("batch", 4, 7, 32)))
    k = g.add_input("k", TensorType(DType.FLOAT16, ("batch", 4, 9, 32)))
    att = g.add("Attention", [q, k, k], {}, name="att", outputs=1)[0]
    g.outputs.extend([m, att])
    mix = flop_mix(g, {"x": (5, 3, 16, 16), "q": (5, 4, 7, 32), "k": (5, 4, 9, 32)})
    conv = 2 * (5 * 8 * 16 * 16) * 3 * 9
    fc = 2 * (5 * 10) * (8 * 16 * 16)
    attention = 4 * 5 * 4 * 7 * 9 * 32
    assert mix == {"by_precision": {"float32": conv + fc, "float16": attention}, "unknown": 0}
    assert product_flops(g.nodes[0], {}) is None  # "batch" unbound: not counted, and said so
    assert flop_mix(g, {})["unknown"] == 3


def test_int8_products_and_fused_bodies() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, (4, 16)))
    scale = g.add_initializer("s", torch.tensor(0.1))
    xq = g.add("QuantizeLinear", [x, scale, g.add_initializer("z", torch.tensor(0, dtype=torch.int8))], name="q")[0]
    xd = g.add("DequantizeLinear", [xq, scale], name="dq")[0]
    wq = g.add_initializer("wq", torch.ones(16, 8, dtype=torch.int8))
    wd = g.add("DequantizeLinear", [wq, scale], name="dqw")[0]
    body = Graph("body")
    bx = body.add_input("bx", TensorType(DType.FLOAT32, (4, 16)))
    bw = body.add_input("bw", TensorType(DType.FLOAT32, (16, 8)))
    body.outputs.extend(body.add("Relu", [body.add("MatMul", [bx, bw], name="mm")[0]], name="relu"))
    g.outputs.extend(g.add("Fused", [xd, wd], {"kind": "epilogue", "body": body}, name="fused", outputs=1))
    assert flop_mix(g, {}) == {"by_precision": {"int8": 2 * 4 * 8 * 16}, "unknown": 0}
