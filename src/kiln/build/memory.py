"""Activation memory planning: every intermediate tensor gets an offset in one arena, by liveness.

Sizes are taken at the largest shapes any profile allows (checked at min, opt and max, so a dim that shrinks as
an input grows is still covered). Values whose size is not known before running (data-dependent shapes),
graph outputs (handed to the caller), constants and non-tensors are not planned. Placement is greedy by size:
largest first, each at the lowest offset that does not overlap a value alive at the same time.

Concat elimination: when every input of a Concat is a static-shape intermediate made by a step of its own (not a
graph input, constant or output, read by no other Concat taken this way), each input's slot is a strided view
inside the Concat output's slot, at the place the Concat would copy it to. The producers then write their
results straight into the output buffer and the Concat step has nothing left to copy (its tactic,
`concat.in_place`, checks that and falls back to a real concatenation otherwise). The group is one allocation,
alive from its first producer to the last reader of any member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
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


def _static(v: Value | None) -> tuple[int, ...] | None:
    t = None if v is None else v.type
    if not isinstance(t, TensorType) or t.shape is None or t.dtype is DType.STRING:
        return None
    dims = [d for d in t.shape if isinstance(d, int)]
    return tuple(dims) if len(dims) == len(t.shape) else None


@dataclass
class _Concat:
    node: Node
    pieces: list[tuple[Value, int]]
    """Each input with its element offset inside the output."""
    strides: tuple[int, ...]


def _concats(graph: Graph, outputs: set[Value]) -> list[_Concat]:
    """The Concats whose inputs can be written in place (see the module docstring)."""
    taken: set[Value] = set()
    found = []
    for node in graph.nodes:
        out_shape = _static(node.outputs[0]) if node.op == "Concat" else None
        if out_shape is None or node.outputs[0] in outputs or not out_shape or 0 in out_shape \
                or node.outputs[0].name in graph.layouts:  # the pieces' strides assume a row-major output
            continue
        ins = node.inputs
        if len(set(ins)) != len(ins) or any(v is None or v in taken for v in ins):
            continue
        if any(v.producer is None or v.data is not None or v in outputs or v.producer.op == "Concat"  # type: ignore[union-attr]
               or _static(v) is None or v.dtype != node.outputs[0].dtype for v in ins):  # type: ignore[union-attr]
            continue
        axis = int(node.attrs["axis"]) % len(out_shape)
        strides = tuple(math.prod(out_shape[d + 1:]) for d in range(len(out_shape)))
        pieces, at = [], 0
        for v in ins:
            pieces.append((v, at * strides[axis]))
            at += _static(v)[axis]  # type: ignore[index]
        taken.update(ins)  # type: ignore[arg-type]
        found.append(_Concat(node, pieces, strides))  # type: ignore[arg-type]
    return found


def plan_memory(graph: Graph, profiles: list[Profile]) -> MemoryPlan:
    bindings = [_bindings(graph, p, w) for p in profiles for w in ("min", "opt", "max")] or [{}]
    last = last_uses(graph)
    outputs = set(graph.outputs)
    step = {n: i for i, n in enumerate(graph.nodes)}
    concats = _concats(graph, outputs)
    in_place = {v for c in concats for v, _ in c.pieces}
    items: list[_Item] = []
    for i, node in enumerate(graph.nodes):
        for v in node.outputs:
            if v in outputs or v in in_place or not isinstance(v.type, TensorType):
                continue
            n = _nbytes(v.type, bindings)
            if n is None or n == 0:
                continue
            item = _Item(v, _align(n), i, last.get(v, i))
            for c in concats:
                if c.node.outputs[0] is v:  # the group: alive from the first piece made to its last reader
                    item.start = min(step[p.producer] for p, _ in c.pieces)  # type: ignore[index]
                    item.end = max([item.end] + [last.get(p, item.end) for p, _ in c.pieces])
            items.append(item)
    naive = sum(it.nbytes for it in items) + sum(_align(math.prod(_static(v) or ()) * v.dtype.torch.itemsize)
                                                  for v in in_place)
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
    done = []
    for c in concats:
        whole = slots.get(c.node.outputs[0].name)
        if whole is None:
            continue
        size = c.node.outputs[0].dtype.torch.itemsize
        for v, at in c.pieces:
            extent = sum((d - 1) * s for d, s in zip(_static(v) or (), c.strides)) + 1
            slots[v.name] = Slot(whole.offset + at * size, extent * size, c.strides)
        done.append(c.node.outputs[0].name)
    return MemoryPlan(arena, naive, slots, done)
