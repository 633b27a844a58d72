"""Every tactic kiln knows, per op. Tactic modules register here; the reference tactic covers every op."""

from __future__ import annotations

import torch

from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, Tactic
from kiln.utils.registry import Registry

TACTICS: Registry[Tactic] = Registry("tactic")


def register(tactic: Tactic) -> Tactic:
    TACTICS.add(tactic.name, tactic)
    return tactic


def candidates(node: Node, device: torch.device) -> list[Tactic]:
    """The tactics that can run `node` on `device`, best first by priority (the reference last)."""
    _load()
    found = [t for _, t in TACTICS.items() if node.op in t.ops and t.applicable(node, device)]
    return sorted(found, key=lambda t: (t.priority, t.name))


def first_kernel(node: Node, device: torch.device) -> Kernel:
    """`node` on its best-ranked tactic other than the reference (the reference when there is none), in that
    tactic's first configuration: what a kernel that runs a piece of a fused node the way the unfused graph did
    (untimed) builds for it."""
    tactic = next((t for t in candidates(node, device) if t.name != "reference"), None) or get("reference")
    return tactic.build(node, tactic.configs()[0], device)


def get(name: str) -> Tactic:
    _load()
    return TACTICS[name]


_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        # tactic modules register on import
        from kiln.kernels import attention, conv, cpu, gemm, norm, pointwise, pool, reference, tensor  # noqa: F401
