"""Op table entries: elementwise math, comparisons, logic and activations.

Elementwise ops broadcast numpy-style; their output shape comes from `broadcast_shapes`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, broadcast_shapes, register, same_as

Fn = Callable[..., torch.Tensor]


def unary(name: str, fn: Fn, *, attrs: dict[str, Attr] | None = None, doc: str = "") -> None:
    """An op Y = fn(X, **attrs) whose output has the input's type."""
    register(name, inputs=["X"], outputs=["Y"], attrs=attrs, infer=same_as(0),
             ref=lambda c, xs: [fn(xs[0], **c.attrs)], doc=doc)


def _binary_infer(out_dtype: DType | None) -> Callable[[InferCtx], list[TensorType]]:
    def infer(ctx: InferCtx) -> list[TensorType]:
        shape = broadcast_shapes(ctx, *(ctx.shape(i) for i in range(ctx.n_inputs)))
        return [TensorType(out_dtype or ctx.dtype(0), shape)]

    return infer


def binary(name: str, fn: Fn, *, out_dtype: DType | None = None, attrs: dict[str, Attr] | None = None,
           doc: str = "") -> None:
    """An op C = fn(A, B) with broadcasting; the output has A's dtype unless `out_dtype` is given."""
    register(name, inputs=["A", "B"], outputs=["C"], attrs=attrs, infer=_binary_infer(out_dtype),
             ref=lambda c, xs: [fn(xs[0], xs[1], **c.attrs)], doc=doc)


# --- identity and arithmetic --------------------------------------------------------------------------


def _identity(c: RefCtx, xs: list[Any]) -> list[Any]:
    return [xs[0]]


register("Identity", inputs=["input"], outputs=["output"], infer=same_as(0), ref=_identity,
         doc="Returns its input (tensors, sequences and optionals alike).")

binary("Add", torch.add)
binary("Sub", torch.sub)
binary("Mul", torch.mul)
unary("Relu", torch.relu)
