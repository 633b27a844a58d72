"""Op table entries: tensor creation, shape manipulation and indexing."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register


def _constant_infer(ctx: InferCtx) -> list[TensorType]:
    v = ctx.attrs["value"]
    if isinstance(v, np.ndarray):
        return [TensorType(DType.STRING, tuple(v.shape))]
    dtype = ctx.attrs["dtype"] or DType.from_torch(v.dtype)
    return [TensorType(dtype, tuple(v.shape))]


def _constant_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    return [c.attrs["value"]]


register(
    "Constant", inputs=[], outputs=["output"], infer=_constant_infer, ref=_constant_ref,
    attrs={"value": Attr(AttrKind.TENSOR), "dtype": Attr(AttrKind.DTYPE, None,
                                                         doc="set for narrow types stored widened (int4, ...)")},
    doc="A constant tensor (the ONNX value_* attribute forms are all normalized to `value`).",
)
