"""The tactic contract: one way of running one op on one kind of device.

A tactic declares the ops it implements, an applicability check and its tuning space as data
(`space = {"BLOCK_M": [64, 128]}`); `build` turns a node plus one configuration into a `Kernel`.
The tuner times every applicable (tactic, config) pair at the profile's shapes and keeps the fastest
whose outputs match the op table's reference.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from kiln.ir.graph import Node

Kernel = Callable[[list[Any]], list[Any]]
"""A built kernel: the step's input values (tensors on the engine's device, or None for omitted optional
inputs) -> its output values. Kernels must not modify their inputs and must be safe to call from several
execution contexts at once (they keep no per-call state). Optional attributes the runtime and tuner read: `checks`
(`DeferredCheck`s) and `channels_last_outputs` (set by `plan_layouts`; a result may be a view of an input)."""

SubgraphRunner = Callable[[Any, list[Any]], list[Any]]
"""Runs a subgraph (If/Loop/Scan bodies) with given input values; supplied by the runtime."""


def plan_layouts(kernel: Kernel, node: Node, layouts: Mapping[str, str]) -> None:
    """Tell a kernel that can make its outputs channels-last (it has a `channels_last_outputs` attribute) which of
    them the plan keeps so (`graph.layouts`), so that the runtime need not convert them after it. The runtime and
    the tuner call this after every build, on GPU plans."""
    if hasattr(kernel, "channels_last_outputs"):
        kernel.channels_last_outputs = tuple(v is not None and layouts.get(v.name) == "channels_last"
                                             for v in node.outputs)


class DeferredCheck:
    """A condition on data a GPU kernel finds without stopping (a device-side assertion would leave the CUDA
    context unusable) and without waiting for the host (which would keep it out of CUDA graphs): the kernel
    records it in a one-element flag on its device, carries on with safe values, and the runtime raises `message`
    once the run's results reach the host (`raised`). A kernel that keeps one lists it in its `checks` attribute;
    kernels are built per execution context, so the flag is that context's."""

    def __init__(self, message: str) -> None:
        self.message = message
        self._flags: dict[torch.device, torch.Tensor] = {}

    def flag(self, device: torch.device) -> torch.Tensor:
        """The flag on `device` (a 0-d bool tensor; a kernel may set it to true itself, never to false)."""
        flag = self._flags.get(device)
        if flag is None:  # why: made on a kernel's first call, which is never inside a CUDA graph capture
            flag = self._flags[device] = torch.zeros((), dtype=torch.bool, device=device)
        return flag

    def record(self, bad: torch.Tensor) -> None:
        """Set the flag where any element of the boolean `bad` is true (stays set until `raised` reads it)."""
        flag = self.flag(bad.device)
        torch.logical_or(flag, bad.any(), out=flag)

    def raised(self) -> str | None:
        """The message if the flag was set since the last call (and clear it), else None; reads the device."""
        hit = False
        for flag in self._flags.values():
            if bool(flag):
                hit = True
                flag.zero_()
        return self.message if hit else None


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

    def node_configs(self, node: Node) -> list[dict[str, Any]]:
        """`configs()` in the order to try them on `node`: below the default optimization level the tuner times
        only the first, so a tactic whose first config cannot run some nodes puts another first for those."""
        return self.configs()

    @abstractmethod
    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        """A kernel for `node` with `config`. Weights (constant inputs) arrive at call time like any input."""
