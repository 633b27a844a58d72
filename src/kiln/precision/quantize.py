"""INT8 Q/DQ placement: the inputs of every Conv / Gemm / MatMul with a constant weight (alone or anchoring a
Fused epilogue) get QuantizeLinear -> DequantizeLinear pairs: activations per tensor with the calibrated scale,
weights per output channel (stored as int8, dequantized by a DequantizeLinear that constant folding leaves
alone), symmetric (zero point 0), so the graph computes exactly what int8 x int8 -> int32 GEMMs/convolutions
with a float dequantizing epilogue compute.

Until the int8 kernels exist (GPU tactics that read the DQ-fed anchors as int8 operands), the engine runs the
pairs through their references: the results are the INT8 engine's (for accuracy checks), the speed is not.
Layers without a calibrated scale for their input (or named in `skip`) stay float. Bias and epilogue stay float.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.precision.calibration import weight_scales

ANCHORS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclass
class QuantReport:
    layers: list[str] = field(default_factory=list)
    """Layers whose inputs were quantized."""
    float_layers: dict[str, str] = field(default_factory=dict)
    """Anchoring layers left in float, with why."""

    def to_json(self) -> dict[str, object]:
        return {"int8_layers": len(self.layers), "float_layers": dict(self.float_layers)}


def _anchor(n: Node) -> tuple[Node, int, int] | None:
    """(anchor op node, node input index of its activation, of its weight) for quantizable nodes."""
    if n.op in ANCHORS:
        return n, 0, 1
    if n.op != "Fused" or n.attrs["kind"] != "epilogue":
        return None
    body: Graph = n.attrs["body"]
    a = body.nodes[0]
    if a.op not in ANCHORS or len(a.inputs) < 2 or a.inputs[0] not in body.inputs or a.inputs[1] not in body.inputs:
        return None
    return a, body.inputs.index(a.inputs[0]), body.inputs.index(a.inputs[1])


def _weight_axis(anchor: Node) -> int | None:
    """The output-channel axis of the weight (per-channel scales), None where unsupported."""
    if anchor.op == "Conv":
        return 0
    if anchor.op == "Gemm":
        a = anchor.attrs
        if a["transA"]:
            return None
        return 0 if a["transB"] else 1
    return 1  # MatMul B [K, N]


def quantizable_inputs(graph: Graph) -> list[str]:
    """The activation values whose calibrated scales `quantize_graph` reads."""
    names: list[str] = []
    for n in graph.nodes:
        found = _anchor(n)
        x = None if found is None else n.inputs[found[1]]
        if x is not None and x.name not in names:
            names.append(x.name)
    return names


def model_fingerprint(graph: Graph) -> str:
    """Identifies the optimized graph a calibration cache was made for (its layers and their inputs)."""
    import hashlib

    text = "\n".join(f"{n.op}:{n.name}:{','.join('' if v is None else v.name for v in n.inputs)}" for n in graph.nodes)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def quantize_graph(graph: Graph, act_scales: Mapping[str, float], *, skip: Collection[str] = ()) -> QuantReport:
    """Place Q/DQ pairs (in place). `act_scales`: activation value name -> scale (symmetric int8)."""
    report = QuantReport()
    shared: dict[str, Value] = {}
    for n in list(graph.nodes):
        found = _anchor(n)
        if found is None:
            continue
        anchor, xi, wi = found
        why = _refuse(n, anchor, xi, wi, act_scales, skip)
        if why:
            report.float_layers[n.name] = why
            continue
        x, w = n.inputs[xi], n.inputs[wi]
        assert x is not None and w is not None and isinstance(w.data, torch.Tensor)
        dq_x = shared.get(x.name) or _fake_quant(graph, x, act_scales[x.name])
        shared[x.name] = dq_x
        n.inputs[xi] = dq_x
        n.inputs[wi] = _int8_weight(graph, w, _weight_axis(anchor))  # type: ignore[arg-type]
        report.layers.append(n.name)
    graph.toposort()
    return report


def _refuse(n: Node, anchor: Node, xi: int, wi: int, act_scales: Mapping[str, float],
            skip: Collection[str]) -> str | None:
    x, w = n.inputs[xi], n.inputs[wi]
    if n.name in skip:
        return "kept in float (accuracy gate or request)"
    if x is None or x.name not in act_scales:
        return "no calibrated scale for its input"
    if w is None or not isinstance(w.data, torch.Tensor) or not isinstance(w.type, TensorType):
        return "its weight is not a constant"
    if w.type.dtype is not DType.FLOAT32 or x.dtype is not DType.FLOAT32:
        return f"float32 layers only (got {x.dtype} x {w.type.dtype})"
    if _weight_axis(anchor) is None or (anchor.op != "Conv" and w.data.dim() != 2):
        return "a weight layout kiln does not quantize (transposed A, or a batched weight)"
    return None


def _const(graph: Graph, hint: str, data: torch.Tensor) -> Value:
    return graph.add_initializer(graph.fresh_name(hint), data)


def _fake_quant(graph: Graph, x: Value, scale: float) -> Value:
    s = _const(graph, f"{x.name}.scale", torch.tensor(float(scale), dtype=torch.float32))
    zp = _const(graph, f"{x.name}.zero_point", torch.tensor(0, dtype=torch.int8))
    (q,) = graph.add("QuantizeLinear", [x, s, zp], name=graph.fresh_name(f"{x.name}/quantize"))
    (dq,) = graph.add("DequantizeLinear", [q, s, zp], name=graph.fresh_name(f"{x.name}/dequantize"))
    return dq


def _int8_weight(graph: Graph, w: Value, axis: int) -> Value:
    data = w.data
    assert isinstance(data, torch.Tensor)
    scale = weight_scales(data, axis)
    shape = [1] * data.dim()
    shape[axis] = -1
    q = torch.clamp(torch.round(data / scale.reshape(shape)), -127, 127).to(torch.int8)
    qv = _const(graph, f"{w.name}.int8", q)
    sv = _const(graph, f"{w.name}.scale", scale)
    zv = _const(graph, f"{w.name}.zero_point", torch.zeros(scale.shape, dtype=torch.int8))
    (dq,) = graph.add("DequantizeLinear", [qv, sv, zv], {"axis": axis}, name=graph.fresh_name(f"{w.name}/dequantize"))
    return dq
