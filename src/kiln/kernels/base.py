"""The tactic contract: one way of running one op on one kind of device.

A tactic declares the ops it implements, an applicability check and its tuning space as data
(`space = {"BLOCK_M": [64, 128]}`); `build` turns a node plus one configuration into a `Kernel`.
The tuner times every applicable (tactic, config) pair at the profile's shapes and keeps the fastest
whose outputs match the op table's reference.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from kiln.ir.graph import Node

Kernel = Callable[[list[Any]], list[Any]]
"""A built kernel: the step's input values (tensors on the engine's device, or None for omitted optional
inputs) -> its output values. Kernels must not modify their inputs and must be safe to call from several
execution contexts at once (they keep no per-call state)."""

SubgraphRunner = Callable[[Any, list[Any]], list[Any]]
"""Runs a subgraph (If/Loop/Scan bodies) with given input values; supplied by the runtime."""


class Tactic(ABC):
    """One implementation of some ops. Subclasses set the class attributes and implement `build`.

    - `ops`: the op names it implements.
    - `devices`: "cpu" and/or "cuda".
    - `space`: tuning parameters and their candidate values; the empty dict means one configuration.
    - `priority`: tie-breaker and the order used at optimization level 0 (no timing): lower first.
    - `min_opt_level`: the lowest optimization level whose builds consider it (a tactic not yet measured
      on real hardware stays opt-in, at level 4 and up, so default builds keep their build time and choices).
    """

    name: ClassVar[str]
    ops: ClassVar[frozenset[str]]
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    space: ClassVar[dict[str, Sequence[Any]]] = {}
    priority: ClassVar[int] = 100
    min_opt_level: ClassVar[int] = 0

    def applicable(self, node: Node, device: torch.device) -> bool:
        """Whether this tactic can run `node` (its dtypes, attributes, shapes) on `device`."""
        return device.type in self.devices and node.op in self.ops

    def configs(self) -> list[dict[str, Any]]:
        """Every configuration in the space (the cross product)."""
        if not self.space:
            return [{}]
        keys = sorted(self.space)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.space[k] for k in keys))]

    @abstractmethod
    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        """A kernel for `node` with `config`. Weights (constant inputs) arrive at call time like any input."""
