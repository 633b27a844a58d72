"""`triton.gather`: Gather (embedding lookups) as one Triton kernel.

`cuda.gather` runs a Gather with a runtime index tensor as about eight small torch kernels - the index cast, the
wrap of negative indices, the range test, its reduction into the deferred check's flag, the clamp, the lookup -
which at batch 1 cost more than the lookup itself (BERT-base has three such Gathers before its first layer). Here
one program copies one gathered row: it reads its index, wraps a negative one, records an out-of-range one in the
node's `DeferredCheck` flag (clamping it, so the read stays in bounds), and copies BLOCK elements of the row. The
data is seen as [outer, n, inner] around the gathered axis (n long), the indices flattened to m: the output is
[outer, m, inner]. Offsets are int64. Any data dtype; int32 or int64 indices.

Imports no triton until a kernel is built (`_kernel()` binds `tl` and jits the function).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from kiln.ir.graph import Node
from kiln.kernels import pdl
from kiln.kernels.base import DeferredCheck, Kernel, SubgraphRunner, Tactic
from kiln.kernels.pointwise import triton_available
from kiln.kernels.registry import register
from kiln.kernels.tensor.gather import gatherable

BLOCKS = (256, 1024, 4096)
"""Elements of a row a program copies (the configurations timed); longer rows take several programs."""

tl: Any = None
pdl_sync: Any = None  # `mathlib.pdl_sync`, bound by _kernel()
_checked: Any = None  # `_checked_index` jitted, bound by _kernel()


def _checked_index(i, n, bad_ptr):
    """Index `i` into an axis of `n`: wrapped when negative, recorded in the flag at `bad_ptr` when out of range,
    clamped into range."""
    i = i.to(tl.int64)
    i = tl.where(i < 0, i + n, i)
    tl.store(bad_ptr, 1, mask=(i < 0) | (i >= n))  # why: the run raises it once results reach the host (DeferredCheck)
    return tl.minimum(tl.maximum(i, 0), n - 1)  # why: an out-of-range lookup would be a device-side fault


def _gather_rows(x_ptr, idx_ptr, out_ptr, bad_ptr, n, m, inner, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_sync(PDL)
    row = tl.program_id(0).to(tl.int64)  # an output row: outer index o, index position j
    o = row // m
    j = row % m
    i = _checked(tl.load(idx_ptr + j), n, bad_ptr)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inner
    v = tl.load(x_ptr + (o * n + i) * inner + cols, mask=ok)
    tl.store(out_ptr + row * inner + cols, v, mask=ok)


@functools.cache
def _kernel() -> Any:
    """The jitted kernel; imports triton (TRITON_INTERPRET must be set before this runs, for the interpreter)."""
    import triton
    import triton.language

    from kiln.kernels.pointwise.mathlib import pdl_sync as sync

    g = globals()
    g["tl"] = triton.language
    g["pdl_sync"] = sync
    g["_checked"] = triton.jit(_checked_index)
    return triton.jit(_gather_rows)


def checked_index() -> Any:
    """`_checked_index` jitted, for the other kernels that look rows up by runtime indices (`triton.embedding`)."""
    _kernel()
    return _checked


class TritonGather(Tactic):
    name = "triton.gather"
    ops = frozenset({"Gather"})
    devices = frozenset({"cuda"})
    space = {"BLOCK": BLOCKS}
    priority = 44  # before cuda.gather (45); in default builds since measured on an H200 (2026-11-27, BERT-base
    # batch 1, L2 flushed): the word-embedding lookup 3.9 us vs 18.3 for cuda.gather, the two small ones a tie

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and triton_available() and gatherable(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        axis = int(node.attrs["axis"])
        block = int(config.get("BLOCK", BLOCKS[1]))
        check = DeferredCheck(f"node '{node.name}' (Gather): an index is out of range")

        def run(xs: list[Any]) -> list[Any]:
            x, idx = xs
            a = axis % x.dim()
            n = x.shape[a]
            outer, inner, m = math.prod(x.shape[:a]), math.prod(x.shape[a + 1:]), idx.numel()
            if m and n == 0:
                raise IndexError(f"node '{node.name}' (Gather): the gathered axis is empty")
            out = torch.empty(x.shape[:a] + idx.shape + x.shape[a + 1:], dtype=x.dtype, device=x.device)
            if outer and m and inner:
                flag = check.flag(x.device)
                _kernel()[(outer * m, math.ceil(inner / block))](
                    x.contiguous(), idx.contiguous(), out, flag.view(torch.uint8), n, m, inner, BLOCK=block,
                    **pdl.launch_options())
            return [out]

        run.checks = [check]  # type: ignore[attr-defined]
        return run


register(TritonGather())
