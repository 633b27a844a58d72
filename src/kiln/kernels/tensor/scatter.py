"""`cuda.scatter_elements` and `cuda.gather_elements`: ScatterElements and GatherElements without a host round trip.

The reference checks the index range on the host, which synchronizes the device and keeps the plan out of CUDA
graphs - onnxruntime's GroupQueryAttention, as kiln imports it, writes each step's new keys and values into the
cache with a ScatterElements (and a sliding-window cache's shift with a GatherElements), so every LLM decode step
would run without one. Here negative indices wrap on the
device and the range check is a `DeferredCheck` (as `cuda.gather` does): an index out of range is recorded and
clamped, and the run raises an IndexError naming the node when its results reach the host.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, TensorType
from kiln.kernels.base import DeferredCheck, Kernel, SubgraphRunner, Tactic
from kiln.kernels.registry import register
from kiln.kernels.tensor.gather import checked_indices

_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _indexed(node: Node) -> bool:
    """Data of a torch dtype indexed by int32/int64 indices."""
    x, i = node.inputs[0], node.inputs[1]
    return (x is not None and i is not None and isinstance(x.type, TensorType) and isinstance(i.type, TensorType)
            and x.type.dtype is not DType.STRING and i.type.dtype in (DType.INT64, DType.INT32))


class CudaScatterElements(Tactic):
    name = "cuda.scatter_elements"
    ops = frozenset({"ScatterElements"})
    devices = frozenset({"cuda"})
    priority = 45

    def applicable(self, node: Node, device: torch.device) -> bool:
        return device.type in self.devices and _indexed(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        axis, reduction = int(node.attrs["axis"]), str(node.attrs["reduction"])
        check = DeferredCheck(f"node '{node.name}' (ScatterElements): an index is out of range "
                              "(indices must lie in [-size, size) of the scattered axis)")

        def run(xs: list[Any]) -> list[Any]:
            x, idx, upd = xs
            a = axis % x.dim()
            n = x.shape[a]
            i = checked_indices(idx, n, check, f"node '{node.name}' (ScatterElements): the scattered axis is empty")
            if reduction == "none":
                return [x.scatter(a, i, upd)]
            return [x.scatter_reduce(a, i, upd, _REDUCE[reduction], include_self=True)]

        run.checks = [check]  # type: ignore[attr-defined]
        return run


register(CudaScatterElements())


class CudaGatherElements(Tactic):
    name = "cuda.gather_elements"
    ops = frozenset({"GatherElements"})
    devices = frozenset({"cuda"})
    priority = 45

    def applicable(self, node: Node, device: torch.device) -> bool:
        return device.type in self.devices and _indexed(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        axis = int(node.attrs["axis"])
        check = DeferredCheck(f"node '{node.name}' (GatherElements): an index is out of range "
                              "(indices must lie in [-size, size) of the gathered axis)")

        def run(xs: list[Any]) -> list[Any]:
            x, idx = xs
            a = axis % x.dim()
            i = checked_indices(idx, x.shape[a], check,
                                f"node '{node.name}' (GatherElements): the gathered axis is empty")
            return [torch.gather(x, a, i)]

        run.checks = [check]  # type: ignore[attr-defined]
        return run


register(CudaGatherElements())
