"""Test helper: activation scales from one run, as a min-max calibrator would set them."""

from __future__ import annotations

import torch

from kiln.ir import Graph
from kiln.ir.ops.base import run_nodes


def minmax_scales(g: Graph, x: torch.Tensor) -> dict[str, float]:
    """value name -> max |value| / 127 for every tensor of a run of `g` on its one input `x` (the input included)."""
    env = run_nodes(g.nodes, {g.inputs[0]: x})
    return {v.name: float(t.abs().max()) / 127 for v, t in env.items() if isinstance(t, torch.Tensor)}
