"""int8 flowing between layers: a max pool between two quantized convolutions pools int8 (quantizing first is exact:
it is monotonic), and the first conv then requantizes in its own epilogue. The graph's results do not change."""

from __future__ import annotations

import numpy as np
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.ir.ops.base import run_nodes
from kiln.passes.manager import PassContext
from kiln.passes.pipeline import optimize
from kiln.precision.quantize import fold_quantized, fuse_requantize, hoist_quantize, quantize_graph

F32 = DType.FLOAT32


def _cnn() -> Graph:
    g = Graph()
    gen = torch.Generator().manual_seed(0)
    x = g.add_input("x", TensorType(F32, (2, 3, 16, 16)))
    conv = {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1)}
    (h,) = g.add("Conv", [x, g.add_initializer("w1", torch.randn(8, 3, 3, 3, generator=gen) * 0.3)], conv, name="c1")
    (h,) = g.add("Relu", [h], name="r1")
    (h,) = g.add("MaxPool", [h], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, name="pool",
                 outputs=1)
    (y,) = g.add("Conv", [h, g.add_initializer("w2", torch.randn(4, 8, 3, 3, generator=gen) * 0.2)], conv, name="c2",
                 outputs=["y"])
    g.outputs.append(y)
    optimize(g, PassContext(device="cuda"))
    return g


def test_the_pool_runs_on_int8_and_the_first_conv_requantizes() -> None:
    g = _cnn()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32))
    env = run_nodes(g.nodes, {g.inputs[0]: x})
    scales = {v.name: float(t.abs().max()) / 127 for v, t in env.items() if isinstance(t, torch.Tensor)}
    scales["x"] = float(x.abs().max()) / 127
    assert len(quantize_graph(g, scales).layers) == 2
    before = Interpreter(g).run({"x": x.numpy()})["y"]
    assert len(fold_quantized(g)) == 2
    assert hoist_quantize(g) == ["pool"]
    pool = next(n for n in g.nodes if n.op == "MaxPool")
    assert pool.inputs[0].dtype is DType.INT8 and pool.outputs[0].dtype is DType.INT8  # type: ignore[union-attr]
    assert len(fuse_requantize(g)) == 1  # c1 (+ relu) now ends by quantizing for the pool
    first = next(n for n in g.nodes if n.op == "Fused")
    assert first.attrs["body"].nodes[-1].op == "QuantizeLinear" and first.outputs[0].dtype is DType.INT8
    np.testing.assert_array_equal(Interpreter(g).run({"x": x.numpy()})["y"], before)
