"""ONNX handlers: recurrent nets (RNN, GRU, LSTM) and attention.

RNN/GRU/LSTM versions differ only in attributes: `output_sequence` (opsets 1 and 3) said whether Y is wanted,
which the node's outputs already say; `linear_before_reset` appeared in GRU-3 (absent means 0); `layout`
appeared in 14 (absent means 0); 22 added bfloat16. kiln's ops follow the newest version.

Attention (23, 24, 25), RotaryEmbedding (23) and LinearAttention (27) need no handler: each version's
attributes and inputs are a subset of the newest one's, with the same meaning (24 added `nonpad_kv_seqlen`,
25 the window sizes; the errata of 23 and 24, zero rows for fully masked queries and bottom-right causal
alignment, apply to every version). kiln also accepts `q_num_heads`/`kv_num_heads` on 4-D inputs when they
agree with the inputs, which Attention-25 forbids.
"""

from __future__ import annotations

from typing import Any

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import onnx_op
from kiln.frontend.onnx.tensors import dtype_from_onnx
from kiln.ir.graph import TensorType, Value
from kiln.ir.ops.attention import flex_compute_dtype


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


@onnx_op("FlexAttention", since=1, domain="ai.onnx.preview")
def flex_attention(n: NodeCtx) -> list[Value]:
    """The modifier subgraphs are imported with their input typed as the scores: [B, Hq, L, S] in the
    softmax precision."""
    unknown = set(n.attrs) - {"scale", "softmax_precision", "score_mod", "prob_mod"}
    if unknown:
        raise n.fail(f"attribute '{sorted(unknown)[0]}' is not supported")
    q, k, v = (n.input(i) for i in range(3))
    if q is None or k is None or v is None or len(n.inputs) != 3:
        raise n.fail("FlexAttention takes exactly the three inputs Q, K and V")
    attrs: dict[str, Any] = {"scale": n.attrs.get("scale")}
    sp = n.attrs.get("softmax_precision")
    attrs["softmax_precision"] = None if sp is None else dtype_from_onnx(sp, "attribute 'softmax_precision'")
    cdt = flex_compute_dtype(q.dtype, attrs["softmax_precision"])
    qs, ks = q.shape, k.shape
    shape = None
    if qs is not None and ks is not None and len(qs) == 4 and len(ks) == 4:
        shape = (qs[0], qs[1], qs[2], ks[2])
    for name in ("score_mod", "prob_mod"):
        g = n.attrs.get(name)
        if g is None:
            continue
        declared = [i for i in g.input if i.name not in {t.name for t in g.initializer}]
        if len(declared) != 1:
            raise n.fail(f"{name} must take one input (the scores), it declares {len(declared)}")
        attrs[name] = n.subgraph(name, [TensorType(cdt, shape)])
    return n.emit("FlexAttention", [q, k, v], attrs)
