"""An "embedding" Fused node (`kiln.passes.fuse_embeddings`: lookups and other terms summed, then a LayerNorm of the
sum) two ways, both tuned:

- `triton.embedding`: one Triton kernel, a program per token: it reads the token's row from each table (the index
  wrapped, range-checked into the lookup's `DeferredCheck` and clamped, as `triton.gather` does), adds the other
  terms' rows (a term of shape [seq, hidden] gives row `token % seq`), normalizes the float32 sum and writes the
  result once (and the sum, when the node outputs it too). Up to 3 lookups and 2 other terms, rows up to 16384
  values (one block).
- `split.embedding`: the body's nodes one after the other, each on its best-ranked kernel (as the unfused graph
  ran them), so the tuner never loses what the graph did before the fusion.

Imports no triton until a kernel is built (`_kernel()` binds `tl` and jits the function).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from kiln.ir.graph import Graph, Node
from kiln.kernels import pdl
from kiln.kernels.base import DeferredCheck, Kernel, SubgraphRunner, Tactic
from kiln.kernels.pointwise import triton_available
from kiln.kernels.registry import register
from kiln.kernels.tensor.triton_gather import checked_index
from kiln.utils.errors import InputError, UnsupportedError

MAX_LOOKUPS, MAX_TERMS, MAX_ROW = 3, 2, 16384

tl: Any = None
pdl_sync: Any = None  # `mathlib.pdl_sync`, bound by _kernel()
_lookup: Any = None  # `_lookup_row` jitted, bound by _kernel()
_checked: Any = None  # `triton_gather.checked_index()`, bound by _kernel()


def _lookup_row(table, ids, n, flag, row, cols, ok, H):
    """One lookup's row for token `row`, in float32: the index wrapped, checked and clamped as triton.gather does."""
    i = _checked(tl.load(ids + row), n, flag)
    return tl.load(table + i * H + cols, mask=ok, other=0.0).to(tl.float32)


def _embedding_rows(out_ptr, sum_ptr, t0, i0, n0, f0, t1, i1, n1, f1, t2, i2, n2, f2, a0, r0, a1, r1, g_ptr, b_ptr,
                    H, eps, LOOKUPS: tl.constexpr, TERMS: tl.constexpr, HAS_B: tl.constexpr, SUM: tl.constexpr,
                    BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_sync(PDL)
    row = tl.program_id(0).to(tl.int64)  # a token
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    acc = _lookup(t0, i0, n0, f0, row, cols, ok, H)
    if LOOKUPS > 1:
        acc += _lookup(t1, i1, n1, f1, row, cols, ok, H)
    if LOOKUPS > 2:
        acc += _lookup(t2, i2, n2, f2, row, cols, ok, H)
    if TERMS > 0:  # a term of r rows (the same for every batch) gives its row `token % r`
        acc += tl.load(a0 + (row % r0) * H + cols, mask=ok, other=0.0).to(tl.float32)
    if TERMS > 1:
        acc += tl.load(a1 + (row % r1) * H + cols, mask=ok, other=0.0).to(tl.float32)
    if SUM:  # the sum itself is read elsewhere too (GPT-2's residual stream)
        tl.store(sum_ptr + row * H + cols, acc.to(sum_ptr.dtype.element_ty), mask=ok)
    mean = tl.sum(acc, axis=0) / H
    d = tl.where(ok, acc - mean, 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(d * d, axis=0) / H + eps))
    y = d * rstd * tl.load(g_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_B:
        y += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _kernel() -> Any:
    """The jitted kernel; imports triton (TRITON_INTERPRET must be set before this runs, for the interpreter)."""
    import triton
    import triton.language

    from kiln.kernels.pointwise.mathlib import pdl_sync as sync

    g = globals()
    g["tl"] = triton.language
    g["pdl_sync"] = sync
    g["_checked"] = checked_index()
    g["_lookup"] = triton.jit(_lookup_row)
    return triton.jit(_embedding_rows)


@dataclass(frozen=True)
class EmbeddingSpec:
    """An embedding node in the kernel's terms (`*_at`: indices into the node's inputs)."""

    lookups: tuple[tuple[int, int, str], ...]
    """(table, indices, the Gather's name) per lookup."""
    terms: tuple[int, ...]
    scale_at: int
    b_at: int | None
    eps: float
    keep_sum: bool = False
    """The node outputs the sum as well, before the norm's result."""


def embedding_spec(node: Node) -> EmbeddingSpec | None:
    """The spec of an "embedding" Fused node, or None when its body is not lookups, Adds and a LayerNorm."""
    if node.op != "Fused" or node.attrs.get("kind") != "embedding":
        return None
    body: Graph = node.attrs["body"]
    at = {v: i for i, v in enumerate(body.inputs)}
    *parts, norm = body.nodes
    if norm.op != "LayerNormalization" or body.outputs[-1] is not norm.outputs[0] \
            or body.outputs[:-1] not in ([], [norm.inputs[0]]):
        return None
    lookups, terms = [], []
    made = {o for n in parts for o in n.outputs}
    for n in parts:
        if n.op == "Gather" and n.inputs[0] in at and n.inputs[1] in at:
            lookups.append((at[n.inputs[0]], at[n.inputs[1]], n.name))
        elif n.op == "Add":
            terms += [at[v] for v in n.inputs if v not in made and v in at]
            if any(v is None or (v not in made and v not in at) for v in n.inputs):
                return None
        else:
            return None
    scale, b = norm.inputs[1], norm.inputs[2] if len(norm.inputs) > 2 else None
    if not lookups or len(lookups) > MAX_LOOKUPS or len(terms) > MAX_TERMS or scale not in at \
            or (b is not None and b not in at):
        return None
    return EmbeddingSpec(tuple(lookups), tuple(terms), at[scale], None if b is None else at[b],
                         float(norm.attrs["epsilon"]), len(body.outputs) == 2)


class TritonEmbedding(Tactic):
    name = "triton.embedding"
    ops = frozenset({"Fused"})
    devices = frozenset({"cuda"})
    priority = 39  # after split.embedding: untimed builds keep the kernels the unfused graph ran

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and triton_available() and embedding_spec(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        s = embedding_spec(node)
        if s is None:
            raise UnsupportedError(f"{self.name} takes an embedding Fused node", op=node.op, node=node.name)
        checks = [DeferredCheck(f"node '{name}' (Gather): an index is out of range") for _, _, name in s.lookups]

        def run(xs: list[Any]) -> list[Any]:
            first = xs[s.lookups[0][0]]
            h = first.shape[1]
            if h > MAX_ROW:
                raise InputError(f"{self.name}: rows of {h} values, at most {MAX_ROW}")
            ids = [xs[i].contiguous() for _, i, _ in s.lookups]
            rows = ids[0].numel()
            out = torch.empty((*ids[0].shape, h), dtype=first.dtype, device=first.device)
            total = torch.empty_like(out) if s.keep_sum else out
            args: list[Any] = []
            for (t_at, _, _), idx, check in zip(s.lookups, ids, checks):
                table = xs[t_at].contiguous()
                if idx.numel() != rows or table.shape[1] != h:
                    raise InputError(f"{self.name}: lookups of {idx.numel()} and {rows} indices, or rows of "
                                     f"{table.shape[1]} and {h} values")
                if rows and table.shape[0] == 0:
                    raise IndexError(f"{check.message}: the table is empty")
                args += [table, idx, table.shape[0], check.flag(first.device).view(torch.uint8)]
            args += [out, ids[0], 1, out] * (MAX_LOOKUPS - len(s.lookups))  # unused slots
            for k in s.terms:
                term = xs[k].contiguous()
                if term.numel() % h or (rows and rows % (term.numel() // h)):
                    raise InputError(f"{self.name}: a term of shape {list(term.shape)} does not repeat over the "
                                     f"{rows} rows of {h} values")
                args += [term, max(term.numel() // h, 1)]
            args += [out, 1] * (MAX_TERMS - len(s.terms))
            g = xs[s.scale_at].contiguous()
            b = xs[s.b_at].contiguous() if s.b_at is not None else g
            if rows and h:
                block = max(16, 1 << (h - 1).bit_length())
                _kernel()[(rows,)](out, total, *args, g, b, h, s.eps, LOOKUPS=len(s.lookups), TERMS=len(s.terms),
                                   HAS_B=s.b_at is not None, SUM=s.keep_sum, BLOCK=block,
                                   num_warps=4 if block <= 2048 else 8, **pdl.launch_options())
            return [total, out] if s.keep_sum else [out]

        run.checks = checks  # type: ignore[attr-defined]
        return run


class SplitEmbedding(Tactic):
    """The body's nodes in order, each on its best-ranked kernel (module docstring)."""

    name = "split.embedding"
    ops = frozenset({"Fused"})
    devices = frozenset({"cuda"})
    priority = 38  # first: untimed builds (opt level 0, deterministic without a cache) run what the graph ran

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and node.attrs.get("kind") == "embedding"

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        from kiln.kernels import registry

        body: Graph = node.attrs["body"]
        steps = [(n, registry.first_kernel(n, device)) for n in body.nodes]
        checks = [c for _, k in steps for c in getattr(k, "checks", [])]

        def run(xs: list[Any]) -> list[Any]:
            env: dict[Any, Any] = {v: x for v, x in zip(body.inputs, xs)}
            for n, k in steps:
                for v, r in zip(n.outputs, k([None if v is None else env[v] for v in n.inputs])):
                    env[v] = r
            return [env[v] for v in body.outputs]

        run.checks = checks  # type: ignore[attr-defined]
        return run


register(TritonEmbedding())
register(SplitEmbedding())
