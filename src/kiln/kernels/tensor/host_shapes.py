"""`cuda.host_shapes`: ops whose constant inputs are sizes, axes or indices read on the host (Reshape's shape,
Slice's starts/ends, Unsqueeze's axes ...), run by the op's reference with those inputs as host copies made once
at build time.

On a GPU the engine's constants live on the device, so the reference would copy them back to the host at every
call: a synchronization that costs a stall per step and makes the plan impossible to capture in a CUDA graph.
Values, not these inputs, stay on the device; results are the reference's (views where it makes views).
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Node
from kiln.ir.ops import get_op
from kiln.ir.ops.base import RefCtx
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.registry import register

HOST_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Slice": (1, 2, 3, 4), "Tile": (1,),
    "Pad": (1, 3), "Split": (1,), "ConstantOfShape": (0,), "CenterCropPad": (1,), "TopK": (1,), "Trilu": (1,),
    "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
    "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
    "Resize": (1, 2, 3),
}
"""Per op, the inputs that are read on the host (sizes, axes, counts), never used as device data."""


def _host_consts(node: Node) -> dict[int, torch.Tensor]:
    out = {}
    for i in HOST_INPUTS.get(node.op, ()):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and isinstance(v.data, torch.Tensor):
            out[i] = v.data
    return out


class HostShapes(Tactic):
    name = "cuda.host_shapes"
    ops = frozenset(HOST_INPUTS)
    devices = frozenset({"cuda"})
    priority = 45

    def applicable(self, node: Node, device: torch.device) -> bool:
        if device.type not in self.devices or node.op not in HOST_INPUTS:
            return False
        wanted = [i for i in HOST_INPUTS[node.op] if i < len(node.inputs) and node.inputs[i] is not None]
        return bool(wanted) and all(isinstance(node.inputs[i].data, torch.Tensor) for i in wanted)  # type: ignore[union-attr]

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        host = {i: t.detach().to("cpu") for i, t in _host_consts(node).items()}
        ref = get_op(node.op).ref
        ctx = RefCtx(node)

        def run(xs: list[Any]) -> list[Any]:
            args = [host.get(i, x) for i, x in enumerate(xs)]
            return list(ref(ctx, args))

        return run


register(HostShapes())
