"""INT8 Q/DQ placement: the inputs of every Conv / Gemm / MatMul with a constant weight (alone or anchoring a
Fused epilogue) get QuantizeLinear -> DequantizeLinear pairs: activations per tensor with the calibrated scale,
weights per output channel (stored as int8, dequantized by a DequantizeLinear that constant folding leaves
alone), symmetric (zero point 0), so the graph computes exactly what int8 x int8 -> int32 GEMMs/convolutions
with a float dequantizing epilogue compute.

`fold_quantized` then turns each Q/DQ-fed layer into one "quantized" node that the int8 tactics run as int8 x int8
-> int32 products (the reference, which runs the same body, stays the yardstick). Layers without a calibrated
scale for their input (or named in `skip`) stay float. Bias and epilogue stay float.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.passes.rewrite import BodyInputs, Uses
from kiln.precision.calibration import QMAX, SCALE_FLOOR, weight_scales

ANCHORS = frozenset({"Conv", "Gemm", "MatMul"})


FP8_MAX = 448.0
"""The largest finite float8 E4M3 (fn) value: FP8 scales are amax / FP8_MAX."""


@dataclass
class QuantReport:
    layers: list[str] = field(default_factory=list)
    """Layers whose inputs were quantized."""
    float_layers: dict[str, str] = field(default_factory=dict)
    """Anchoring layers left in float, with why."""
    fp8: bool = False
    residuals: list[str] = field(default_factory=list)
    """Layers whose residual add reads int8 (`_int8_residuals`)."""

    def to_json(self) -> dict[str, object]:
        return {"fp8_layers" if self.fp8 else "int8_layers": len(self.layers), "float_layers": dict(self.float_layers),
                "int8_residuals": len(self.residuals)}


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
    """The activation values whose calibrated scales `quantize_graph` reads: the layers' inputs, then the residual
    operands of conv layers that a layer makes (`residual_operands`)."""
    names: list[str] = []
    for n in graph.nodes:
        found = _anchor(n)
        x = None if found is None else n.inputs[found[1]]
        if x is not None and x.name not in names:
            names.append(x.name)
    return names + [name for name in residual_operands(graph) if name not in names]


def residual_operands(graph: Graph) -> list[str]:
    """Values that conv layers add to their result and that a Conv/Gemm/MatMul layer makes (a bottleneck's
    downsample branch): with a calibrated scale, an int8 build has that layer write them in int8
    (`_int8_residuals`)."""
    made = {o: n for n in graph.nodes for o in n.outputs}
    return [x.name for x in _residual_candidates(graph) if x in made and _anchor(made[x]) is not None]


def model_fingerprint(graph: Graph) -> str:
    """Identifies the optimized graph a calibration cache was made for (its layers and their inputs)."""
    import hashlib

    text = "\n".join(f"{n.op}:{n.name}:{','.join('' if v is None else v.name for v in n.inputs)}" for n in graph.nodes)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def quantize_graph(graph: Graph, act_scales: Mapping[str, float], *, skip: Collection[str] = (),
                   min_channels: int = 1, fp8: bool = False, residuals: bool = True) -> QuantReport:
    """Place Q/DQ pairs (in place). `act_scales`: activation value name -> scale (symmetric int8); convs with fewer
    than `min_channels` input channels per group stay float (`MIN_INT8_CHANNELS` for GPU builds). `fp8`: float8
    E4M3 instead of int8, GEMM weights per tensor too (FP8 GEMMs scale whole operands), conv weights per output
    channel (grouped convs stay float): the same calibrated range
    (threshold = int8 scale x 127) mapped onto E4M3's +-448. `residuals` (int8): the residual adds of quantized
    conv layers read int8 - the block input's int8 copy, or a downsample branch written in int8
    (`_int8_residuals`)."""
    report = QuantReport(fp8=fp8)
    shared: dict[str, Value] = {}
    for n in list(graph.nodes):
        found = _anchor(n)
        if found is None:
            continue
        anchor, xi, wi = found
        why = _refuse(n, anchor, xi, wi, act_scales, skip, min_channels)
        if not why and fp8 and anchor.op == "Conv" and int(anchor.attrs.get("group", 1)) != 1:
            why = "no FP8 grouped-convolution kernel: kept in the float precision"
        if why:
            report.float_layers[n.name] = why
            continue
        x, w = n.inputs[xi], n.inputs[wi]
        assert x is not None and w is not None and isinstance(w.data, torch.Tensor)
        scale = act_scales[x.name] * (QMAX / FP8_MAX if fp8 else 1.0)
        dq_x = shared.get(x.name) or _fake_quant(graph, x, scale, fp8)
        shared[x.name] = dq_x
        n.inputs[xi] = dq_x
        if fp8:  # a conv's weight per output channel (the conv template scales each), a GEMM's per tensor
            n.inputs[wi] = _fp8_weight(graph, w, 0 if anchor.op == "Conv" else None)
        else:
            n.inputs[wi] = _int8_weight(graph, w, _weight_axis(anchor))  # type: ignore[arg-type]
        report.layers.append(n.name)
    if residuals and not fp8:
        report.residuals = _int8_residuals(graph, shared, act_scales, set(report.layers))
    graph.toposort()
    return report


def _int8_residuals(graph: Graph, copies: dict[str, Value], act_scales: Mapping[str, float],
                    quantized: set[str]) -> list[str]:
    """Residual adds of quantized conv layers read int8: where a tensor is otherwise read only as such an operand,
    the adds read a dequantized int8 copy of it - the copy it already has (a ResNet block's input: quantized for the
    block's first conv, `copies`: name -> its DequantizeLinear output), or, when a quantized layer makes it and its
    scale was calibrated (`residual_operands`; a bottleneck's downsample branch), a new one. The tensor's producer
    then writes int8 alone (`fuse_requantize`), each add reads a quarter of the bytes (half of float16's), and
    `fold_quantized` moves the dequantization into the adding layer's epilogue. The residual then carries int8
    rounding (half a step of its calibrated scale), as TensorRT's int8 residual fusions do. Returns the layers
    whose residual changed."""
    uses = Uses.of(graph)
    made = {o: n for n in graph.nodes for o in n.outputs}
    changed: list[str] = []
    for x in _residual_candidates(graph, quantized):
        if x not in made or x in uses.outputs:  # a graph input stays: nothing would stop writing a float copy
            continue
        dq = copies.get(x.name)
        q = dq.producer.inputs[0].producer if dq is not None and dq.producer else None  # type: ignore[union-attr]
        readers = [r for r in uses.readers.get(x, []) if r is not q]
        if not readers or not all(_residual_reader(r, x, quantized) for r in readers):
            continue
        if dq is None:
            if made[x].name not in quantized or x.name not in act_scales:
                continue  # a float producer would leave the quantize as a pass of its own
            dq = copies[x.name] = _fake_quant(graph, x, act_scales[x.name])
        for r in readers:
            r.inputs = [dq if v is x else v for v in r.inputs]
            changed.append(r.name)
    return changed


def _conv_epilogue(n: Node) -> Graph | None:
    """The body of a conv layer with an epilogue (a Fused "epilogue" node anchored by a Conv), else None."""
    body = n.attrs.get("body") if n.op == "Fused" and n.attrs.get("kind") == "epilogue" else None
    return body if isinstance(body, Graph) and body.nodes[0].op == "Conv" else None


def _residual_candidates(graph: Graph, layers: Collection[str] | None = None) -> list[Value]:
    """The values conv layers (those named in `layers`, else every conv layer) add to their result in their
    epilogue, in graph order."""
    found: list[Value] = []
    for n in graph.nodes:
        body = _conv_epilogue(n)
        if body is None or (layers is not None and n.name not in layers):
            continue
        for v in (v for m in body.nodes[1:] if m.op == "Add" for v in m.inputs):
            x = n.inputs[body.inputs.index(v)] if v in body.inputs else None
            if x is not None and x not in found:
                found.append(x)
    return found


def _residual_reader(n: Node, x: Value, quantized: set[str]) -> bool:
    """Whether `n` is a quantized conv layer reading `x` only as an operand of Add steps in its epilogue."""
    body = _conv_epilogue(n) if n.name in quantized else None
    if body is None:
        return False
    inner = {b for b, v in zip(body.inputs, n.inputs) if v is x}
    steps = [m for m in body.nodes if any(v in inner for v in m.inputs)]
    return bool(steps) and all(m.op == "Add" and m is not body.nodes[0] for m in steps) \
        and not any(v in inner for v in body.outputs)


MIN_INT8_CHANNELS = 16
"""GPU builds keep convs with fewer input channels per group in float (`quantize_graph(min_channels=...)`): int8
tensor cores take K in steps of 32 bytes, so a 3-channel stem or a depthwise conv would mostly multiply padding
(ResNet-50's RGB stem as an int8 implicit GEMM: 3.6 ms at batch 128 on an H100, vs 0.30 ms for cuDNN's FP16).
Accuracy is not the reason: keeping ResNet-50's stem float changed its INT8 cosine by 1e-5."""


def _refuse(n: Node, anchor: Node, xi: int, wi: int, act_scales: Mapping[str, float],
            skip: Collection[str], min_channels: int) -> str | None:
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
    if anchor.op == "Conv" and w.data.dim() >= 3 and int(w.data.shape[1]) < min_channels:
        return (f"{int(w.data.shape[1])} input channels per group (< {min_channels}): on int8 tensor cores the "
                f"conv would mostly multiply padding (an RGB stem, a depthwise conv)")
    return None


def _const(graph: Graph, hint: str, data: torch.Tensor) -> Value:
    return graph.add_initializer(graph.fresh_name(hint), data)


def _fake_quant(graph: Graph, x: Value, scale: float, fp8: bool = False) -> Value:
    s = _const(graph, f"{x.name}.scale", torch.tensor(float(scale), dtype=torch.float32))
    zero = torch.zeros((), dtype=torch.float8_e4m3fn) if fp8 else torch.tensor(0, dtype=torch.int8)
    zp = _const(graph, f"{x.name}.zero_point", zero)  # its type is the quantized type (ONNX)
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


def _fp8_weight(graph: Graph, w: Value, axis: int | None = None) -> Value:
    """w as float8 E4M3 with one scale (amax / 448) - or, with `axis`, one per channel along it - rounded to nearest
    even and saturated, + its DequantizeLinear."""
    data = w.data
    assert isinstance(data, torch.Tensor)
    if axis is None:
        scale = torch.tensor(max(float(data.detach().float().abs().max()) / FP8_MAX, SCALE_FLOOR),
                             dtype=torch.float32)
        shaped = scale
    else:
        scale = weight_scales(data, axis) * (QMAX / FP8_MAX)  # amax / 448 per channel
        shape = [1] * data.dim()
        shape[axis] = -1
        shaped = scale.reshape(shape)
    q = (data.float() / shaped).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    qv = _const(graph, f"{w.name}.fp8", q)
    sv = _const(graph, f"{w.name}.scale", scale)
    zv = _const(graph, f"{w.name}.zero_point", torch.zeros(scale.shape, dtype=torch.float8_e4m3fn))
    attrs = {} if axis is None else {"axis": axis}
    (dq,) = graph.add("DequantizeLinear", [qv, sv, zv], attrs, name=graph.fresh_name(f"{w.name}/dequantize"))
    return dq


# --- folding Q/DQ into int8 layers ------------------------------------------------------------------------------

FOLDED = frozenset({"Gemm", "MatMul", "Conv"})
"""Anchors whose DQ-fed inputs are folded into one "quantized" node."""


def fold_quantized(graph: Graph) -> list[str]:
    """Every Gemm/MatMul/Conv layer (bare or anchoring an epilogue) whose activation is DequantizeLinear(an int8
    tensor) and whose weight is DequantizeLinear(a constant int8 tensor) becomes one Fused node of kind
    "quantized": its inputs are the int8 activation, the int8 weight and their scales and zero points (then the
    layer's other inputs), its body the two DequantizeLinear nodes followed by the layer's own nodes. The reference
    runs the body, so results do not change; the int8 tactics (`cuda.int8_gemm`, `triton.int8_conv`) read the node as
    int8 x int8 -> int32 plus a dequantizing epilogue. The DequantizeLinear nodes stay in the graph while other
    layers read them. Returns the folded layers' names."""
    producers = {o: n for n in graph.nodes for o in n.outputs}
    folded: list[str] = []
    for n in list(graph.nodes):
        found = _anchor(n)
        if found is None or found[0].op not in FOLDED:
            continue
        _, xi, wi = found
        dx, dw = producers.get(n.inputs[xi]), producers.get(n.inputs[wi])  # type: ignore[arg-type]
        if not (_int8_dq(dx, constant=False) and _int8_dq(dw, constant=True)):
            continue
        assert dx is not None and dw is not None
        if dx.inputs[0].dtype is not dw.inputs[0].dtype:  # type: ignore[union-attr]
            continue  # int8 x int8 or fp8 x fp8 only
        assert dx is not None and dw is not None
        node = _quantized_node(graph, n, xi, wi, dx, dw)
        _dequantize_in_epilogue(graph, node, producers)
        at = graph.nodes.index(n)
        graph.remove_nodes([n])
        graph.insert_node(node, at)
        folded.append(node.name)
    if folded:
        used = {v for m in graph.nodes for v in m.inputs if v is not None} | set(graph.outputs)
        graph.remove_nodes([m for m in graph.nodes if m.op == "DequantizeLinear" and m.outputs[0] not in used])
    return folded


FOLDED_TYPES = frozenset({DType.INT8, DType.FLOAT8_E4M3FN})


def _int8_dq(n: Node | None, constant: bool) -> bool:
    """A DequantizeLinear of an int8 (or float8 E4M3) tensor - a constant one when `constant` - with zero points
    of that type."""
    if n is None or n.op != "DequantizeLinear" or len(n.inputs) < 2 or n.inputs[0] is None:
        return False
    q = n.inputs[0]
    if not isinstance(q.type, TensorType) or q.type.dtype not in FOLDED_TYPES:
        return False
    if constant != isinstance(q.data, torch.Tensor):
        return False
    zp = n.inputs[2] if len(n.inputs) > 2 else None
    return zp is None or (isinstance(zp.type, TensorType) and zp.type.dtype is q.type.dtype)


def _quantized_node(graph: Graph, n: Node, xi: int, wi: int, dx: Node, dw: Node) -> Node:
    """The "quantized" Fused node standing for layer `n` (see `fold_quantized`)."""
    body_inputs: list[Value | None]
    if n.op == "Fused":
        inner: Graph = n.attrs["body"]
        nodes, body_inputs, outputs = list(inner.nodes), list(inner.inputs), list(inner.outputs)
    else:  # a bare layer: its own one-node body
        body_inputs = [None if v is None else Value(graph.fresh_name(f"{v.name}.in"), v.type) for v in n.inputs]
        clone = Node(n.op, list(body_inputs), [Value(graph.fresh_name(f"{o.name}.inner"), o.type)
                                               for o in n.outputs], dict(n.attrs), n.name)
        nodes, outputs = [clone], list(clone.outputs)
    body = Graph(f"{n.name} (int8)", parent=graph)
    outer: list[Value] = []
    fresh: list[Value] = []

    def take(v: Value) -> Value:
        b = Value(graph.fresh_name(f"{v.name}.in"), v.type)
        outer.append(v)
        fresh.append(b)
        return b

    dqs = []
    for d in (dx, dw):
        ins = [take(v) if v is not None else None for v in d.inputs]
        o = Value(graph.fresh_name(f"{d.outputs[0].name}.inner"), d.outputs[0].type)
        dqs.append(Node("DequantizeLinear", ins, [o], dict(d.attrs), d.name))
    remap = {body_inputs[xi]: dqs[0].outputs[0], body_inputs[wi]: dqs[1].outputs[0]}
    for k, (bv, ov) in enumerate(zip(body_inputs, n.inputs)):
        if k in (xi, wi) or bv is None or ov is None:
            continue
        remap[bv] = take(ov)
    for m in nodes:
        m.inputs = [remap.get(v, v) if v is not None else None for v in m.inputs]
    body.inputs = fresh
    body.nodes = [*dqs, *nodes]
    body.outputs = outputs
    for m in body.nodes:
        for o in m.outputs:
            o.producer = m
    return Node("Fused", list[Value | None](outer), list(n.outputs), {"body": body, "kind": "quantized"}, n.name)


def _dequantize_in_epilogue(graph: Graph, node: Node, producers: Mapping[Value, Node]) -> None:
    """Each epilogue operand of the "quantized" `node` that is DequantizeLinear(an int8/uint8 tensor) with a
    constant per-tensor scale and zero point (an int8 residual, `_int8_residuals`) is read as the 8-bit tensor: the
    DequantizeLinear becomes the first epilogue step (right after the anchor)."""
    body: Graph = node.attrs["body"]
    anchor = body.nodes[2]
    for k in range(len(node.inputs) - 1, -1, -1):
        v, b = node.inputs[k], body.inputs[k]
        d = producers.get(v) if v is not None else None
        if d is None or not _int8_dq(d, constant=False) or not _constant_scalars(d) or b in anchor.inputs \
                or int(d.attrs.get("block_size") or 0):
            continue
        q = d.inputs[0]
        if q is None or q.dtype not in (DType.INT8, DType.UINT8):
            continue
        params = [None if p is None else Value(graph.fresh_name(f"{p.name}.in"), p.type) for p in d.inputs]
        del node.inputs[k], body.inputs[k]
        for p, bp in zip(d.inputs, params):
            if p is not None and bp is not None:
                node.inputs.append(p)
                body.inputs.append(bp)
        step = Node("DequantizeLinear", params, [b], dict(d.attrs), graph.fresh_name(f"{d.name}/in_epilogue"))
        b.producer = step
        body.nodes.insert(body.nodes.index(anchor) + 1, step)


def fuse_requantize(graph: Graph) -> list[str]:
    """A QuantizeLinear that is the only reader of a "quantized" layer's output becomes the last step of that
    layer's body: the layer then writes int8 (or, an FP8 layer, float8) for the next one (dequantize, bias,
    activation, requantize in one epilogue) instead of a float tensor that a separate pass reads back to quantize.
    Where others read the float result too (a ResNet block's output: the next block's residual add), an int8
    conv layer writes both: the float result and, as a second output, its int8 copy (`_dual_output`). The
    reference runs the same ops, so results do not change. Returns the names of the layers that now write 8-bit
    values."""
    uses = Uses.of(graph)  # readers inside subgraphs count too
    fused: list[str] = []
    for q, v, f in _eight_bit_quantizes(graph):
        if f.op != "Fused" or f.attrs.get("kind") != "quantized" or len(f.outputs) != 1:
            continue
        if _to_fp8(q) and not _fp8_layer(f):
            continue  # float8 outputs are written by FP8 layers' epilogues only
        dual = uses.only_reader(v) is not q
        if dual and not (_to_8bit_int(q) and _dual_output(f)):
            continue
        body: Graph = f.attrs["body"]
        inner_out = body.outputs[0]
        params: list[Value | None] = []
        for p in q.inputs[1:]:
            if p is None:
                params.append(None)
                continue
            if _to_fp8(q) and p.dtype is DType.FLOAT8_E4M3FN and isinstance(p.data, torch.Tensor):
                # why: generated epilogues read float8 only as a constant (the zero point, 0); the scale stays an
                # input, which the tuner's float32 second opinion widens with the layer's other inputs
                params.append(body.add_initializer(graph.fresh_name(f"{p.name}.c"), p.data.clone()))
                continue
            b = Value(graph.fresh_name(f"{p.name}.in"), p.type)
            body.inputs.append(b)
            f.inputs.append(p)
            params.append(b)
        out = Value(graph.fresh_name(f"{q.outputs[0].name}.inner"), q.outputs[0].type)
        step = Node("QuantizeLinear", [inner_out, *params], [out], dict(q.attrs), q.name)
        out.producer = step
        body.nodes.append(step)
        body.outputs = [inner_out, out] if dual else [out]
        _take_outputs(graph, f, q, keep=dual)
        fused.append(f.name)
    return fused


def _eight_bit_quantizes(graph: Graph) -> list[tuple[Node, Value, Node]]:
    """(QuantizeLinear to int8/uint8/float8 E4M3, its input, the node computing that input) for each such node."""
    producers = {o: n for n in graph.nodes for o in n.outputs}
    found = []
    for q in graph.nodes:
        if q.op != "QuantizeLinear" or not q.inputs or q.inputs[0] is None or not (_to_8bit_int(q) or _to_fp8(q)):
            continue
        made_by = producers.get(q.inputs[0])
        if made_by is not None:
            found.append((q, q.inputs[0], made_by))
    return found


def _dual_output(f: Node) -> bool:
    """Whether a "quantized" layer may write its float result and an int8 copy: a 2-D, ungrouped int8 Conv (what
    the Triton int8 conv templates store twice); the int8 GEMMs (cuBLAS, Triton MatMul) write one output."""
    body: Graph = f.attrs["body"]
    if len(body.nodes) < 3 or body.nodes[2].op != "Conv" or int(body.nodes[2].attrs.get("group", 1)) != 1:
        return False
    w = body.nodes[1].inputs[0]
    data = f.inputs[body.inputs.index(w)] if w in body.inputs else None
    return data is not None and isinstance(data.data, torch.Tensor) and data.data.dim() == 4 \
        and data.data.dtype == torch.int8


QUANTIZING = frozenset({"LayerNormalization", "RMSNormalization", "Attention"})
"""Ops whose GPU kernels can quantize their own result (`triton.norm_quantize`, `triton.flash_attention`)."""


def fuse_output_quantize(graph: Graph) -> list[str]:
    """A LayerNormalization / RMSNormalization / Attention whose (first) result a per-tensor QuantizeLinear (int8,
    uint8 or float8 E4M3, constant scale and zero point) reads becomes one Fused node of kind "quantizing" (body:
    the op, then the quantize): its kernel writes the 8-bit values itself, and its float result only when something
    else reads it (a transformer's residual add). That saves the quantize pass's read of the whole tensor. The
    reference runs the same ops, so results do not change. Returns the fused ops' names."""
    uses = Uses.of(graph)  # readers inside subgraphs count too
    fused: list[str] = []
    for q, y, op in _eight_bit_quantizes(graph):
        if op.op not in QUANTIZING or op.outputs[0] is not y or not _constant_scalars(q) \
                or op.name in fused:  # a second QuantizeLinear of the same result stays a pass
            continue
        if any(uses.readers.get(o) or o in uses.outputs for o in op.outputs[1:]):
            continue  # its other outputs (a norm's statistics, an attention's cache) are read: left alone
        keep_y = bool([r for r in uses.readers.get(y, []) if r is not q]) or y in uses.outputs
        node = _quantizing_node(graph, op, q, keep_y)
        at = graph.nodes.index(op)
        graph.remove_nodes([op, q])
        graph.insert_node(node, at)
        fused.append(node.name)
    return fused


def _quantizing_node(graph: Graph, op: Node, q: Node, keep_y: bool) -> Node:
    """The "quantizing" Fused node standing for `op` (a norm or an attention) then `q` (see
    `fuse_output_quantize`); `keep_y`: it also outputs the float result."""
    body = Graph(f"{op.name} (quantized)", parent=graph)
    made = BodyInputs(graph)
    take = made.take
    y, yq = op.outputs[0], q.outputs[0]
    y_in = Value(graph.fresh_name(f"{y.name}.inner"), y.type)
    q_in = Value(graph.fresh_name(f"{yq.name}.inner"), yq.type)
    body.nodes = [Node(op.op, [take(v) for v in op.inputs], [y_in], dict(op.attrs), op.name),
                  Node("QuantizeLinear", [y_in, *(take(v) for v in q.inputs[1:])], [q_in], dict(q.attrs), q.name)]
    body.inputs = made.inputs
    body.outputs = [y_in, q_in] if keep_y else [q_in]
    for m in body.nodes:
        for o in m.outputs:
            o.producer = m
    node = Node("Fused", made.outer, [y, yq] if keep_y else [yq], {"body": body, "kind": "quantizing"},
                op.name)
    for o in node.outputs:
        o.producer = node
    return node


def _constant_scalars(q: Node) -> bool:
    """A QuantizeLinear with a constant positive one-value scale and a constant one-value zero point (or none)."""
    zp = q.inputs[2] if len(q.inputs) > 2 else None
    return _positive_scalar(q.inputs[1] if len(q.inputs) > 1 else None) and (
        zp is None or (isinstance(zp.data, torch.Tensor) and zp.data.numel() == 1))


def hoist_quantize(graph: Graph) -> list[str]:
    """MaxPool(x) read only by QuantizeLinear(s, z) with a positive per-tensor scale becomes QuantizeLinear(x) then
    MaxPool on the int8 values: quantizing is monotonic, so the max of the quantized values is the quantized max,
    exactly. The pool then reads and writes int8, and x's producer requantizes in its epilogue (`fuse_requantize`).
    Only where that producer is a quantized layer: after a float one (a float16 stem conv on cuDNN) the quantize
    would stay a pass, over the pool's input (4x the values of its output for a 3x3/2 pool). Returns the pools
    moved."""
    uses = Uses.of(graph)  # readers inside subgraphs count too
    producers = {o: n for n in graph.nodes for o in n.outputs}
    moved: list[str] = []
    for q in list(graph.nodes):
        if q.op != "QuantizeLinear" or not q.inputs or q.inputs[0] is None or len(q.inputs) < 2 \
                or not _to_8bit_int(q):
            continue
        pooled = q.inputs[0]
        pool = producers.get(pooled)
        if pool is None or pool.op != "MaxPool" or len(pool.outputs) != 1 or pool.inputs[0] is None:
            continue
        if uses.only_reader(pooled) is not q or not _positive_scalar(q.inputs[1]):
            continue
        zp = q.inputs[2] if len(q.inputs) > 2 else None
        if zp is not None and (not isinstance(zp.data, torch.Tensor) or zp.data.numel() != 1):
            continue
        x = pool.inputs[0]
        made_by = producers.get(x)
        if made_by is None or made_by.op != "Fused" or made_by.attrs.get("kind") != "quantized":
            continue
        assert isinstance(x.type, TensorType) and isinstance(q.outputs[0].type, TensorType)
        xq = Value(graph.fresh_name(f"{x.name}/quantized"), TensorType(q.outputs[0].type.dtype, x.type.shape))
        early = Node("QuantizeLinear", [x, *q.inputs[1:]], [xq], dict(q.attrs), graph.fresh_name(f"{q.name}/early"))
        graph.insert_node(early, graph.nodes.index(pool))
        pool.inputs[0] = xq
        _take_outputs(graph, pool, q)
        moved.append(pool.name)
    return moved


def _take_outputs(graph: Graph, node: Node, q: Node, keep: bool = False) -> None:
    """`node` now makes what the QuantizeLinear `q` made (its readers are untouched) - after its own output when
    `keep`; `q` leaves the graph."""
    node.outputs = [*node.outputs, *q.outputs] if keep else list(q.outputs)
    for o in node.outputs:
        o.producer = node
    graph.remove_nodes([q])


def _to_8bit_int(q: Node) -> bool:
    """A QuantizeLinear to int8/uint8 (the kernels that requantize in their epilogue, and the int8 max pool, write
    those)."""
    out = q.outputs[0]
    return isinstance(out.type, TensorType) and out.type.dtype in (DType.INT8, DType.UINT8)


def _to_fp8(q: Node) -> bool:
    """A saturating QuantizeLinear to float8 E4M3 with one scale and a zero point of 0: what an FP8 layer's
    generated epilogue writes (the next FP8 GEMM's input)."""
    out, scale = q.outputs[0], q.inputs[1] if len(q.inputs) > 1 else None
    zp = q.inputs[2] if len(q.inputs) > 2 else None
    if not isinstance(out.type, TensorType) or out.type.dtype is not DType.FLOAT8_E4M3FN or scale is None:
        return False
    if int(q.attrs.get("saturate", 1)) != 1 or scale.shape is None or any(d != 1 for d in scale.shape):
        return False
    return zp is None or (isinstance(zp.data, torch.Tensor) and not bool((zp.data.float() != 0).any()))


def _fp8_layer(f: Node) -> bool:
    """A "quantized" layer whose activation is float8 (its first body node dequantizes a float8 input)."""
    body: Graph = f.attrs["body"]
    first = body.nodes[0] if body.nodes else None
    x = first.inputs[0] if first is not None and first.op == "DequantizeLinear" and first.inputs else None
    return x is not None and isinstance(x.type, TensorType) and x.type.dtype is DType.FLOAT8_E4M3FN


def _positive_scalar(v: Value | None) -> bool:
    return v is not None and isinstance(v.data, torch.Tensor) and v.data.numel() == 1 and float(v.data) > 0
