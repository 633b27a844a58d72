"""ONNX handlers: tensor creation, shape manipulation and indexing."""

from __future__ import annotations

import numpy as np
import torch

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import onnx_op
from kiln.ir.convert import from_numpy
from kiln.ir.dtype import DType
from kiln.ir.graph import Value


@onnx_op("Constant")
def constant(n: NodeCtx) -> list[Value]:
    """All value_* forms become one tensor attribute."""
    a = n.attrs
    if "value" in a or "sparse_value" in a:
        data = a.get("value", a.get("sparse_value"))
        dtype = _tensor_dtype(n, "value") if "value" in a else None
    elif "value_float" in a:
        data, dtype = torch.tensor(a["value_float"], dtype=torch.float32), DType.FLOAT32
    elif "value_floats" in a:
        data, dtype = torch.tensor(a["value_floats"], dtype=torch.float32), DType.FLOAT32
    elif "value_int" in a:
        data, dtype = torch.tensor(a["value_int"], dtype=torch.int64), DType.INT64
    elif "value_ints" in a:
        data, dtype = torch.tensor(a["value_ints"], dtype=torch.int64), DType.INT64
    elif "value_string" in a:
        data, dtype = np.array(a["value_string"], dtype=object), DType.STRING
    elif "value_strings" in a:
        data, dtype = np.array(list(a["value_strings"]), dtype=object), DType.STRING
    else:
        raise n.fail("Constant has no value attribute")
    return n.emit("Constant", [], {"value": data, "dtype": dtype if dtype is not None and dtype.is_narrow else None})


def _tensor_dtype(n: NodeCtx, attr: str) -> DType | None:
    """The declared element type of a TENSOR attribute (needed for narrow types stored widened)."""
    for a in n.proto.attribute:
        if a.name == attr:
            from kiln.frontend.onnx.tensors import dtype_from_onnx

            return dtype_from_onnx(a.t.data_type)
    return None


_ = from_numpy
