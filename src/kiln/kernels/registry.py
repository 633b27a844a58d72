"""Every tactic kiln knows, per op. Tactic modules register here; the reference tactic covers every op."""

from __future__ import annotations

import torch

from kiln.ir.graph import Node
from kiln.kernels.base import Tactic
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
