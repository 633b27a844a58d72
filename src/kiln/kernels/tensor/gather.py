"""`cuda.gather`: Gather (embedding lookups, constant-index selections) without a host round trip.

The reference checks the index range on the host, which synchronizes the device and keeps the plan out of CUDA
graphs. Here negative indices wrap on the device and the range check is a `DeferredCheck`: an index out of
range is recorded on the device and clamped (so the lookup reads valid memory), and the run raises an
IndexError naming the node when its results reach the host - the CUDA context stays usable (a device-side
assertion would leave it broken), and a run with valid indices never waits for the host. Constant indices that
are consecutive (a single one included) select a view of the data: no kernel at all.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, TensorType
from kiln.kernels.base import DeferredCheck, Kernel, SubgraphRunner, Tactic
from kiln.kernels.registry import register


def gatherable(node: Node) -> bool:
    """A Gather of a typed tensor of rank >= 1 (not strings) by int32 or int64 indices: what the GPU gathers take."""
    x, i = node.inputs[0], node.inputs[1]
    if x is None or i is None:
        return False
    tx, ti = x.type, i.type
    return (isinstance(tx, TensorType) and isinstance(ti, TensorType) and tx.rank is not None and tx.rank > 0
            and ti.rank is not None and tx.dtype is not DType.STRING and ti.dtype in (DType.INT64, DType.INT32))


def checked_indices(idx: torch.Tensor, n: int, check: DeferredCheck, empty: str) -> torch.Tensor:
    """`idx` as int64 positions on an axis of `n`: negative ones wrapped, any still out of range recorded in
    `check` and clamped (an out-of-range access would be a device-side fault); IndexError(`empty`) when there are
    indices but the axis is empty."""
    i = idx.to(torch.int64)
    i = torch.where(i < 0, i + n, i)
    if i.numel() and n == 0:
        raise IndexError(empty)
    if i.numel():
        check.record((i < 0) | (i >= n))
        i = i.clamp(0, n - 1)
    return i


class CudaGather(Tactic):
    name = "cuda.gather"
    ops = frozenset({"Gather"})
    devices = frozenset({"cuda"})
    priority = 45

    def applicable(self, node: Node, device: torch.device) -> bool:
        return device.type in self.devices and gatherable(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        axis = int(node.attrs["axis"])
        where = f"node '{node.name}' (Gather): an index is out of range"
        host = node.inputs[1].data if node.inputs[1] is not None else None
        fixed = host.detach().to("cpu", torch.int64) if isinstance(host, torch.Tensor) else None
        ready: dict[tuple[torch.device, int], tuple[torch.Tensor, int | None]] = {}

        def constant_index(n: int, dev: torch.device) -> tuple[torch.Tensor, int | None]:
            """The constant indices wrapped and checked once on the host, copied to the device once (a copy
            from the host cannot happen inside a CUDA graph capture; the first call is never captured), and the
            first of them when they are consecutive (start, start + 1, ...: the result is then a view, no copy -
            a ViT's or BERT's class-token selection)."""
            found = ready.get((dev, n))
            if found is None:
                assert fixed is not None
                i = torch.where(fixed < 0, fixed + n, fixed)
                if i.numel() and (int(i.min()) < 0 or int(i.max()) >= n):
                    raise IndexError(f"{where} for a dim of size {n}")
                flat = i.reshape(-1)
                run = flat.numel() > 0 and torch.equal(flat, torch.arange(int(flat[0]), int(flat[0]) + flat.numel()))
                found = ready[(dev, n)] = (i.to(dev), int(flat[0]) if run else None)
            return found

        check = DeferredCheck(f"{where} (indices must lie in [-size, size) of the gathered axis)")

        def run(xs: list[Any]) -> list[Any]:
            x, idx = xs
            a = axis % x.dim()
            n = x.shape[a]
            if fixed is not None and idx is host:
                i, start = constant_index(n, x.device)
                if start is not None:
                    return [x.narrow(a, start, i.numel()).reshape(x.shape[:a] + i.shape + x.shape[a + 1:])]
            else:
                i = checked_indices(idx, n, check, f"{where}: the gathered axis is empty")
            out = x.index_select(a, i.reshape(-1))
            return [out.reshape(x.shape[:a] + i.shape + x.shape[a + 1:])]

        run.checks = [check]  # type: ignore[attr-defined]
        return run


register(CudaGather())
