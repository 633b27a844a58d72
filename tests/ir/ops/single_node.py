"""Small ONNX models of one node, for op tests that import through the ONNX frontend."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper


def single_node_model(op: str, inputs: dict[str, np.ndarray], n_out: int = 1, opset: int = 22,
                      consts: dict[str, np.ndarray] | None = None, **attrs: Any) -> onnx.ModelProto:
    """`op` applied to graph inputs named as `inputs` (then `consts` as initializers); outputs y0, y1, ..."""
    consts = consts or {}
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, list(inputs) + list(consts), outs, **attrs)
    g = helper.make_graph(
        [node], "t",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outs],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10  # readable by older onnxruntime releases too
    return m
