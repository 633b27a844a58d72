"""Activation memory planning: every intermediate tensor gets an offset in one arena, by liveness.

Sizes are taken at the largest shapes any profile allows (checked at min, opt and max, so a dim that shrinks as
an input grows is still covered). Values whose size is not known before running (data-dependent shapes),
graph outputs (handed to the caller), constants and non-tensors are not planned. Placement is greedy by size:
largest first, each at the lowest offset that does not overlap a value alive at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, TensorType, Value
from kiln.ir.interpreter import last_uses
from kiln.runtime.plan import MemoryPlan, Profile, Slot

ALIGN = 256


@dataclass
class _Item:
    value: Value
    nbytes: int
    start: int
    end: int


def _bindings(graph: Graph, profile: Profile, which: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in graph.inputs:
        if not isinstance(v.type, TensorType) or v.type.shape is None:
            continue
        r = profile.shapes.get(v.name)
        if r is None:
            continue
        shape = getattr(r, which)
        for d, n in zip(v.type.shape, shape):
            if isinstance(d, str) and sym.symbols(d) == {d}:
                out[d] = n
    return out


def _nbytes(t: TensorType, bindings: list[dict[str, int]]) -> int | None:
    if t.shape is None or t.dtype is DType.STRING:
        return None
    best = 0
    for b in bindings:
        try:
            n = sym.prod(sym.evaluate(d, b) for d in t.shape)
        except (KeyError, ValueError, TypeError):
            return None
        if not isinstance(n, int) or n < 0:
            return None
        best = max(best, int(n * t.dtype.torch.itemsize))
    return best


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_memory(graph: Graph, profiles: list[Profile]) -> MemoryPlan:
    bindings = [_bindings(graph, p, w) for p in profiles for w in ("min", "opt", "max")] or [{}]
    last = last_uses(graph)
    outputs = set(graph.outputs)
    items: list[_Item] = []
    for i, node in enumerate(graph.nodes):
        for v in node.outputs:
            if v in outputs or not isinstance(v.type, TensorType):
                continue
            n = _nbytes(v.type, bindings)
            if n is None or n == 0:
                continue
            items.append(_Item(v, _align(n), i, last.get(v, i)))
    naive = sum(it.nbytes for it in items)
    placed: list[tuple[_Item, int]] = []
    slots: dict[str, Slot] = {}
    for it in sorted(items, key=lambda x: (-x.nbytes, x.start, x.value.name)):
        busy = sorted((off, off + p.nbytes) for p, off in placed if p.start <= it.end and it.start <= p.end)
        offset = 0
        for lo, hi in busy:
            if offset + it.nbytes <= lo:
                break
            offset = max(offset, hi)
        placed.append((it, offset))
        slots[it.value.name] = Slot(offset, it.nbytes)
    arena = max((off + it.nbytes for it, off in placed), default=0)
    return MemoryPlan(arena, naive, slots)
