"""What the GPU GEMM and convolution tactics share: reading a Fused[epilogue] node (or a bare anchor) as
anchor + epilogue steps, and running the steps a library call could not absorb.

The anchor runs in a library (cuBLAS, cuDNN); a bias it can take goes with it. The rest of the epilogue (an
activation, a residual add, a scale, a cast) becomes one generated pointwise kernel applied in place on the
anchor's output (`kiln.kernels.pointwise`), or - where the generator refuses a step - the op table's references,
step by step. Either way the result is the body's, by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.ops.base import run_nodes, value_of

FLOATS = frozenset({DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16})


@dataclass
class Anchored:
    """A node as anchor + epilogue. `arg[i]` is the node input feeding the anchor's input i (None: omitted)."""

    node: Node
    anchor: Node
    arg: list[int | None]
    steps: list[Node]
    body: Graph | None
    """The Fused body (None for a bare anchor node)."""

    @staticmethod
    def of(node: Node, anchors: frozenset[str]) -> Anchored | None:
        if node.op in anchors:
            return Anchored(node, node, list(range(len(node.inputs))), [], None)
        if node.op != "Fused" or node.attrs["kind"] != "epilogue":
            return None
        body: Graph = node.attrs["body"]
        anchor = body.nodes[0]
        if anchor.op not in anchors or len(body.outputs) != 1:
            return None
        arg: list[int | None] = []
        for v in anchor.inputs:
            if v is None:
                arg.append(None)
            elif v in body.inputs:
                arg.append(body.inputs.index(v))
            else:
                return None  # a body-local constant: not a shape the tactics take
        return Anchored(node, anchor, arg, body.nodes[1:], body)

    def input(self, i: int) -> Value | None:
        j = self.arg[i] if i < len(self.arg) else None
        return None if j is None else self.node.inputs[j]

    def constant(self, i: int) -> torch.Tensor | None:
        v = self.input(i)
        return v.data if v is not None and isinstance(v.data, torch.Tensor) else None

    def dtypes_ok(self) -> bool:
        vals = [v for v in (*self.node.inputs, *self.node.outputs) if v is not None]
        return all(isinstance(v.type, TensorType) and v.type.dtype in FLOATS for v in vals)

    def step_operand(self, k: int) -> tuple[Node, Value | None, torch.Tensor | None]:
        """Step k, its operand other than the accumulator (if it has exactly one) and that operand's value when
        it is a constant."""
        step = self.steps[k]
        acc = self.anchor.outputs[0] if k == 0 else self.steps[k - 1].outputs[0]
        others = [v for v in step.inputs if v is not None and v is not acc]
        if len(others) != 1 or sum(v is acc for v in step.inputs) != 1:
            return step, None, None
        v = others[0]
        outer = self.node.inputs[self.body.inputs.index(v)] if self.body is not None and v in self.body.inputs \
            else None
        data = v.data if isinstance(v.data, torch.Tensor) else (outer.data if outer is not None else None)
        return step, v, data if isinstance(data, torch.Tensor) else None


def tail(a: Anchored, start: int) -> Callable[[torch.Tensor, list[Any]], torch.Tensor]:
    """A function applying steps[start:] to the accumulator (the output of steps[start-1], or of the anchor)."""
    steps = a.steps[start:]
    if not steps:
        return lambda acc, xs: acc
    acc_value = a.anchor.outputs[0] if start == 0 else a.steps[start - 1].outputs[0]
    body = a.body
    assert body is not None
    out = body.outputs[0]

    def run(acc: torch.Tensor, xs: list[Any]) -> torch.Tensor:
        env: dict[Value, Any] = dict(zip(body.inputs, xs))
        env[acc_value] = acc
        return value_of(out, run_nodes(steps, env, acc.device), acc.device)

    kernel = _generated(a, start)
    if kernel is None:
        return run
    generated = kernel
    return lambda acc, xs: generated(acc, xs) if acc.is_cuda else run(acc, xs)  # Triton kernels run on GPUs


@dataclass
class StepsView:
    """steps[start:] in the shape `epilogue_graph` reads: nodes[0] makes the accumulator, nodes[1:] the steps."""

    name: str
    nodes: list[Node]
    inputs: list[Value]
    outputs: list[Value]


def steps_view(a: Anchored, start: int = 0) -> StepsView:
    """steps[start:] with the node that makes their accumulator, as a graph-like view for `epilogue_graph` (the
    anchor need not be the body's first node: a "quantized" body dequantizes before it)."""
    assert a.body is not None
    maker = a.anchor if start == 0 else a.steps[start - 1]
    return StepsView(a.body.name, [maker, *a.steps[start:]], a.body.inputs, a.body.outputs)


def _generated(a: Anchored, start: int) -> Callable[[torch.Tensor, list[Any]], torch.Tensor] | None:
    """steps[start:] as one generated pointwise kernel (in place on the accumulator when the types allow)."""
    try:
        from kiln.kernels.pointwise import triton_available
        from kiln.kernels.pointwise.codegen import PointwiseKernel, epilogue_graph
    except ImportError:
        return None
    if a.body is None or not triton_available():
        return None
    found = epilogue_graph(cast(Graph, steps_view(a, start)))
    if found is None:
        return None
    graph, sources = found
    kernel = PointwiseKernel(graph)
    same = graph.outputs[0].type == graph.inputs[0].type

    def run(acc: torch.Tensor, xs: list[Any]) -> torch.Tensor:
        return kernel([acc, *(xs[i] for i in sources)], out=[acc] if same else None)[0]

    return run
