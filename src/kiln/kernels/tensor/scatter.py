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


class _IndexedElements(Tactic):
    """ScatterElements / GatherElements: data of a torch dtype indexed along `axis` by int32/int64 indices, the
    range checked on the device."""

    devices = frozenset({"cuda"})
    priority = 45
    verb = ""
    """'scattered' or 'gathered', for the messages."""

    def applicable(self, node: Node, device: torch.device) -> bool:
        x, i = node.inputs[0], node.inputs[1]
        return (device.type in self.devices and x is not None and i is not None and isinstance(x.type, TensorType)
                and isinstance(i.type, TensorType) and x.type.dtype is not DType.STRING
                and i.type.dtype in (DType.INT64, DType.INT32))

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        axis = int(node.attrs["axis"])
        what = f"node '{node.name}' ({node.op})"
        check = DeferredCheck(f"{what}: an index is out of range (indices must lie in [-size, size) of the "
                              f"{self.verb} axis)")

        def run(xs: list[Any]) -> list[Any]:
            x, idx, *rest = xs
            a = axis % x.dim()
            i = checked_indices(idx, x.shape[a], check, f"{what}: the {self.verb} axis is empty")
            return [self.compute(node, x, a, i, rest)]

        run.checks = [check]  # type: ignore[attr-defined]
        return run

    def compute(self, node: Node, x: torch.Tensor, axis: int, idx: torch.Tensor, rest: list[Any]) -> torch.Tensor:
        raise NotImplementedError


class CudaScatterElements(_IndexedElements):
    name = "cuda.scatter_elements"
    ops = frozenset({"ScatterElements"})
    verb = "scattered"

    def compute(self, node: Node, x: torch.Tensor, axis: int, idx: torch.Tensor, rest: list[Any]) -> torch.Tensor:
        reduction = str(node.attrs["reduction"])
        if reduction == "none":
            return x.scatter(axis, idx, rest[0])
        return x.scatter_reduce(axis, idx, rest[0], _REDUCE[reduction], include_self=True)


class CudaGatherElements(_IndexedElements):
    name = "cuda.gather_elements"
    ops = frozenset({"GatherElements"})
    verb = "gathered"

    def compute(self, node: Node, x: torch.Tensor, axis: int, idx: torch.Tensor, rest: list[Any]) -> torch.Tensor:
        return torch.gather(x, axis, idx)


register(CudaScatterElements())
register(CudaGatherElements())
