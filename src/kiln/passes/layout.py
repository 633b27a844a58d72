"""Layout decision: where convolutions on the GPU should see channels-last (NHWC) activations.

cuDNN's (and the Triton conv templates') fast paths for FP16/BF16 tensor cores want channels-last data; feeding
them row-major NCHW costs a transpose on the way in and out of every convolution. This pass groups 4-D values
into regions connected through ops that take any memory format at no cost - convolutions (data input and
output), elementwise ops and pointwise groups, pooling, BatchNormalization, Resize, a channel Concat - and marks
every value of a region that holds a convolution as channels-last (`graph.layouts[name] = "channels_last"`; the
logical shape stays NCHW). Regions are maximal, so a conversion happens only where a region meets an op that
reads its input in row-major order (Reshape, Flatten, MatMul ...), a graph input or a graph output: the fewest
conversions for that choice. The runtime converts there and nowhere else.

Cases:
- Conv -> Relu -> MaxPool -> Conv: one region, channels-last throughout, conversions only at the graph input and
  where the last value leaves (e.g. Flatten before the classifier);
- a residual block (Conv, Conv, Add(x, y)): x, y and the sum in one region;
- no convolution in a region (a transformer's 4-D attention tensors): left row-major;
- fewer convolutions than conversions (ViT's patch embedding: one conv, its input and its reshaped output):
  left row-major;
- a Transpose(0, 2, 3, 1) reading a channels-last value costs nothing (ConvNeXt's blocks: the permuted tensor
  is that value's memory), so it is no conversion;
- an INT8 build: its "quantized" convolutions count as convolutions and per-tensor Quantize/DequantizeLinear as
  elementwise, so int8 activations stay channels-last from layer to layer (the builder decides again after
  folding the Q/DQ pairs, since quantization adds values the first decision never saw).

Only for GPU builds (`PassContext.device == "cuda"`); on CPU the tactics choose their own internal layouts.
"""

from __future__ import annotations

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.passes.manager import Pass, PassContext, PassResult
from kiln.passes.pointwise_fusion import is_elementwise

CHANNELS_LAST = "channels_last"
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
CONVS = frozenset({"Conv", "ConvTranspose"})


def _4d(v: Value | None) -> bool:
    """A 4-D activation: float, or int8/uint8 (a quantized one, between int8 layers)."""
    return v is not None and isinstance(v.type, TensorType) and v.type.rank == 4 \
        and (v.type.dtype.is_float or v.type.dtype in (DType.INT8, DType.UINT8))


def _conv_data(n: Node) -> Value | None:
    """The activation input of a 2-D convolution (plain or anchoring an epilogue), else None."""
    if n.op in CONVS:
        return n.inputs[0] if _4d(n.inputs[0]) else None
    if n.op == "Fused" and n.attrs["kind"] == "epilogue":
        body: Graph = n.attrs["body"]
        anchor = body.nodes[0]
        if anchor.op in CONVS and anchor.inputs[0] in body.inputs and _4d(anchor.inputs[0]):
            return n.inputs[body.inputs.index(anchor.inputs[0])]
    if n.op == "Fused" and n.attrs["kind"] == "quantized":  # dequantize x, dequantize w, conv, epilogue
        body = n.attrs["body"]
        if len(body.nodes) < 3 or body.nodes[2].op not in CONVS or body.nodes[0].op != "DequantizeLinear":
            return None
        xq = body.nodes[0].inputs[0]
        if xq in body.inputs and body.nodes[2].inputs[0] is body.nodes[0].outputs[0]:
            x = n.inputs[body.inputs.index(xq)]
            return x if _4d(x) else None
    return None


def _per_tensor_q(n: Node) -> bool:
    """A QuantizeLinear/DequantizeLinear with one scale: elementwise, whatever the memory format."""
    if n.op not in ("QuantizeLinear", "DequantizeLinear") or len(n.inputs) < 2:
        return False
    scale = n.inputs[1]
    return scale is not None and scale.shape is not None and all(d == 1 for d in scale.shape)


def _members(n: Node) -> list[Value]:
    """The values of `n` that share one region when `n` takes any memory format at no cost (else [])."""
    data = _conv_data(n)
    if data is not None:  # with an epilogue's full-size operands (a residual), read in step with the output
        outs = [v for v in n.outputs if _4d(v)]
        full = [v for v in n.inputs[1:] if v is not None and _4d(v) and v.data is None and outs
                and v.shape == outs[0].shape]
        return [data, *full, *outs]
    agnostic = (
        (n.op == "Fused" and n.attrs["kind"] == "pointwise") or (n.op != "Fused" and is_elementwise(n))
        or _per_tensor_q(n)
        or n.op in POOLS or n.op in ("BatchNormalization", "Resize")
        or (n.op == "Concat" and n.outputs[0].rank == 4 and int(n.attrs["axis"]) in (1, -3))
    )
    if not agnostic or not n.outputs or not _4d(n.outputs[0]):
        return []
    domain = n.outputs[0].shape
    keep = n.op in POOLS or n.op in ("Resize", "Concat")
    ins = [v for v in n.inputs if v is not None and _4d(v) and (keep or v.shape == domain)]
    return [*ins, *(v for v in n.outputs if _4d(v))]


class _Regions:
    def __init__(self) -> None:
        self.parent: dict[Value, Value] = {}

    def find(self, v: Value) -> Value:
        self.parent.setdefault(v, v)
        while self.parent[v] is not v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, vs: list[Value]) -> None:
        for v in vs[1:]:
            self.parent[self.find(v)] = self.find(vs[0])


def decide_layout(graph: Graph, device: str) -> PassResult:
    graph.layouts.clear()
    if device != "cuda":
        return PassResult.of(regions=0)
    regions = _Regions()
    flexible: dict[Node, list[Value]] = {}
    for n in graph.nodes:
        vs = _members(n)
        if vs:
            flexible[n] = vs
            regions.union(vs)
    convs: dict[Value, int] = {}
    for n in graph.nodes:
        d = _conv_data(n)
        if d is not None:
            convs[regions.find(d)] = convs.get(regions.find(d), 0) + 1
    chosen: set[Value] = set()
    taken = 0
    for root, count in convs.items():
        members = {v for v in regions.parent if regions.find(v) is root}
        # Worth it when the convolutions outnumber the conversions it costs (a lone patch-embedding conv whose
        # output is reshaped at once - ViT's - would pay two transposes for one channels-last conv).
        if count >= _conversions(graph, members, flexible):
            chosen |= members
            taken += 1
    for v in sorted(chosen, key=lambda v: v.name):
        graph.layouts[v.name] = CHANNELS_LAST
    return PassResult.of(regions=taken, values=len(chosen), conversions=_conversions(graph, chosen, flexible))


def _conversions(graph: Graph, chosen: set[Value], flexible: dict[Node, list[Value]]) -> int:
    """Where a channels-last value meets a row-major reader, writer, graph input or output."""
    n = sum(v in chosen for v in graph.inputs) + sum(v in chosen for v in graph.outputs)
    for node in graph.nodes:
        if _reads_as_nhwc(node):
            continue
        members = set(flexible.get(node, ()))
        n += sum(v in chosen and v not in members for v in node.inputs if v is not None)
    return n


def _reads_as_nhwc(node: Node) -> bool:
    """A Transpose(0, 2, 3, 1) of a 4-D value: a channels-last tensor is that result in memory already (a view,
    no conversion; ConvNeXt's blocks go to NHWC so before their LayerNorm and Linear layers, and come back by
    Transpose(0, 3, 1, 2), which `cuda.transpose` makes a view too)."""
    x = node.inputs[0] if node.inputs else None
    return node.op == "Transpose" and _4d(x) and [int(p) for p in node.attrs.get("perm") or ()] == [0, 2, 3, 1]


def layout(ctx: PassContext) -> Pass:
    return lambda graph: decide_layout(graph, ctx.device)
