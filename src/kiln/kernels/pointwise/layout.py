"""How a generated pointwise kernel walks memory: one flat index over the iteration domain, and per operand the
cheapest expression that turns it into an element offset.

Every operand (inputs, constants, outputs) gets strides in the domain (0 where it broadcasts). Dims of size 1
are dropped and neighbours that are contiguous in every operand merge, so [N,C,H,W] * [1,C,1,1] walks [N, C, HW].
Then each operand's access is one of:
- "flat": contiguous in the (collapsed) domain: offset = index (vectorizable loads and stores);
- "scalar": broadcast everywhere: one load per program;
- "strided": a sum of terms ((index // inner) % span) * stride over runs of dims that are contiguous for that
  operand alone: a bias [N] on [M, N] is `index % N`, a per-channel scale is `(index // HW) % C`.

Integer division per element is what makes such kernels compute-bound, so each term has a mode, from the sizes
and the block: "fixed" when the block never crosses the term's boundary (inner, or for the innermost term its
span, a multiple of BLOCK: the quotient is one scalar per program, the bias index is `start % N + lane`), "step"
when it crosses at most once (at least BLOCK: one scalar division per program and a carry), else "div".

The `Layout` (the access kinds, not the sizes) keys the generated source; sizes and strides are kernel arguments,
so a new batch size reuses the compiled kernel. Offsets use int64 arithmetic only when an offset can reach 2**31.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

WIDE_LIMIT = 2**31 - 2**16
"""Offsets (or element counts) at least this large use int64 index math (the margin covers the last block)."""

Key = tuple[str, int, int]
"""A scalar kernel argument: ("inner", dim, 0) = product of the sizes after dim, ("span", first, last) = product
of sizes first..last, ("stride", operand, term)."""


@dataclass(frozen=True)
class Term:
    """Dims first..last of the collapsed domain, contiguous for one operand; `unit`: the stride of `last` is 1."""

    first: int
    last: int
    unit: bool
    mode: str = "div"
    """"fixed", "step" or "div" (see the module docstring)."""


@dataclass(frozen=True)
class Access:
    kind: str
    """"flat", "scalar" or "strided"."""
    terms: tuple[Term, ...] = ()


@dataclass(frozen=True)
class Layout:
    rank: int
    accesses: tuple[Access, ...]
    wide: bool
    """int64 offsets."""
    even: bool
    """The element count is a multiple of the block size: no masks."""


@dataclass(frozen=True)
class Launch:
    layout: Layout
    numel: int
    args: tuple[int, ...]
    """Values of `arg_keys(layout)`, in that order."""


def domain_strides(shape: Sequence[int], strides: Sequence[int], rank: int) -> list[int]:
    """An operand's strides in a domain of `rank` dims (numpy broadcasting: leading and size-1 dims get 0)."""
    lead = [0] * (rank - len(shape))
    return lead + [0 if size == 1 else st for size, st in zip(shape, strides)]


def collapse(sizes: Sequence[int], strides: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dims and merge neighbours contiguous in every operand; a domain of one element keeps one dim."""
    keep = [d for d, s in enumerate(sizes) if s != 1]
    if not keep:
        return [1], [[1] for _ in strides]
    out_sizes = [sizes[keep[-1]]]
    out_strides = [[s[keep[-1]]] for s in strides]
    for d in reversed(keep[:-1]):
        if all(s[d] == o[0] * out_sizes[0] for s, o in zip(strides, out_strides)):
            out_sizes[0] *= sizes[d]
        else:
            out_sizes.insert(0, sizes[d])
            for s, o in zip(strides, out_strides):
                o.insert(0, s[d])
    return out_sizes, out_strides


def contiguous(sizes: Sequence[int]) -> list[int]:
    out = [1] * len(sizes)
    for d in range(len(sizes) - 2, -1, -1):
        out[d] = out[d + 1] * sizes[d + 1]
    return out


def access(sizes: Sequence[int], strides: Sequence[int]) -> Access:
    if all(s == 0 for s in strides):
        return Access("scalar")
    if list(strides) == contiguous(sizes):
        return Access("flat")
    terms = []
    d = 0
    while d < len(sizes):
        if strides[d] == 0:
            d += 1
            continue
        last = d
        while last + 1 < len(sizes) and strides[last + 1] != 0 and strides[last] == strides[last + 1] * sizes[last + 1]:
            last += 1
        terms.append(Term(d, last, strides[last] == 1))
        d = last + 1
    return Access("strided", tuple(terms))


def with_modes(a: Access, sizes: Sequence[int], block: int) -> Access:
    return Access(a.kind, tuple(replace(t, mode=_mode(t, sizes, block)) for t in a.terms))


def _mode(t: Term, sizes: Sequence[int], block: int) -> str:
    if t.last == len(sizes) - 1:
        if t.first == 0:
            return "div"  # the index itself: nothing to divide
        period = math.prod(sizes[t.first:])
    else:
        period = math.prod(sizes[t.last + 1:])
    if period % block == 0:
        return "fixed"
    return "step" if period >= block else "div"


def arg_keys(layout: Layout) -> list[Key]:
    """The scalar arguments the kernel for `layout` takes after the element count, in order."""
    keys: list[Key] = []
    for k, a in enumerate(layout.accesses):
        for j, t in enumerate(a.terms):
            for key, needed in ((("inner", t.last, 0), t.last < layout.rank - 1),
                                (("span", t.first, t.last), t.first > 0),
                                (("stride", k, j), not t.unit)):
                if needed and key not in keys:
                    keys.append(key)
    return keys


def _value(key: Key, sizes: Sequence[int], strides: Sequence[Sequence[int]], layout: Layout) -> int:
    kind, a, b = key
    if kind == "inner":
        return math.prod(sizes[a + 1:])
    if kind == "span":
        return math.prod(sizes[a:b + 1])
    return strides[a][layout.accesses[a].terms[b].last]


def memory_order(sizes: Sequence[int], strides: Sequence[int]) -> list[int]:
    """The dims from outermost to innermost in memory (largest stride first; ties keep their order): [0, 2, 3, 1]
    for a channels-last [N, C, H, W] tensor."""
    return sorted(range(len(sizes)), key=lambda d: -strides[d])


def plan(domain: Sequence[int], operands: Sequence[tuple[Sequence[int], Sequence[int]]], block: int) -> Launch:
    """The launch for a domain and the (shape, strides) of every operand, in kernel argument order (outputs last).

    The domain's dims are first put in the memory order of the last operand (an output): an elementwise kernel
    may visit elements in any order, and walking them in memory order makes a channels-last tensor (and any
    permuted one) "flat" - coalesced, no index arithmetic - instead of a gather with a stride of C."""
    rank = len(domain)
    full = [domain_strides(shape, st, rank) for shape, st in operands]
    if full and all(st != 0 or n == 1 for n, st in zip(domain, full[-1])):
        order = memory_order(domain, full[-1])
        domain = [domain[d] for d in order]
        full = [[st[d] for d in order] for st in full]
    sizes, strides = collapse(domain, full)
    numel = math.prod(sizes)
    reach = max((sum((n - 1) * s for n, s in zip(sizes, st)) for st in strides), default=0)
    accesses = tuple(with_modes(access(sizes, st), sizes, block) for st in strides)
    layout = Layout(len(sizes), accesses, max(numel, reach) >= WIDE_LIMIT, numel % block == 0)
    args = tuple(_value(k, sizes, strides, layout) for k in arg_keys(layout))
    return Launch(layout, numel, args)
