"""`concat.in_place`: the Concat whose inputs the memory plan put inside its output (see build/memory.py).

Its inputs then already sit, side by side, where a concatenation would copy them: the output is a view of the
first input's storage and nothing is copied. The tactic checks that layout at every call and concatenates for
real when it does not hold (a run outside the arena: the tuner, a reference comparison), so it is always correct.
The memory planner chooses it, never the tuner.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.registry import register


def adjacent_view(xs: list[torch.Tensor], axis: int) -> torch.Tensor | None:
    """The concatenation of `xs` along `axis` as a view, when they already lie contiguously side by side in one
    storage with the strides of a row-major output; None otherwise."""
    first = xs[0]
    shape = list(first.shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    at = first.storage_offset()
    ptr = first.untyped_storage().data_ptr()
    for x in xs:
        if x.untyped_storage().data_ptr() != ptr or x.dtype != first.dtype or x.storage_offset() != at:
            return None
        if any(x.shape[d] != shape[d] for d in range(len(shape)) if d != axis):
            return None
        if any(x.stride(d) != strides[d] for d in range(len(shape)) if x.shape[d] > 1):
            return None
        at += x.shape[axis] * strides[axis]
    return first.as_strided(shape, strides, first.storage_offset())


class ConcatInPlace(Tactic):
    name = "concat.in_place"
    ops = frozenset({"Concat"})
    priority = 2000

    def applicable(self, node: Node, device: torch.device) -> bool:
        return False  # chosen by the memory planner, which knows where the inputs live

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        rank = node.outputs[0].rank or 1
        axis = int(node.attrs["axis"]) % rank

        def run(xs: list[Any]) -> list[Any]:
            view = adjacent_view(xs, axis) if all(isinstance(x, torch.Tensor) for x in xs) else None
            return [view if view is not None else torch.cat(xs, axis)]

        return run


register(ConcatInPlace())
