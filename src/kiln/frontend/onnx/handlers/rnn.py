"""ONNX handlers: recurrent nets (RNN, GRU, LSTM) and attention.

RNN/GRU/LSTM versions differ only in attributes: `output_sequence` (opsets 1 and 3) said whether Y is wanted,
which the node's outputs already say; `linear_before_reset` appeared in GRU-3 (absent means 0); `layout`
appeared in 14 (absent means 0); 22 added bfloat16. kiln's ops follow the newest version.
"""

from __future__ import annotations

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import onnx_op
from kiln.ir.graph import Value


@onnx_op("RNN", since=1)
@onnx_op("GRU", since=1)
@onnx_op("LSTM", since=1)
def recurrent(n: NodeCtx) -> list[Value]:
    attrs = dict(n.attrs)
    if n.since < 7:
        attrs.pop("output_sequence", None)  # Y is computed when the node uses it
    for key in ("activations", "activation_alpha", "activation_beta"):
        if key in attrs and len(attrs[key]) == 0:
            del attrs[key]
    return n.emit(n.op_type, n.inputs, attrs)
