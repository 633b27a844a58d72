"""Norm-GEMM fusion: a LayerNormalization or RMSNormalization over the last axis whose result is the A operand of a
MatMul/Gemm by a constant 2-D weight (bare, or anchoring a Fused[epilogue]) becomes one Fused node of kind
"normalized", so that the GEMM kernel normalizes A's rows as it loads them (`triton.norm_gemm`): the norm's own
kernel, its write of the normalized rows and the GEMM's read of them go away. That is two of a transformer
layer's seven kernels (ViT's pre-LN QKV and FFN-up; BERT's post-LN ones feed the next layer's), which at batch 1
cost more in launches than in bytes. The tuner keeps the two kernels where they are faster (`split.norm_gemm`:
large batches, whose GEMMs a library runs best).

The body is data for the GEMM template:
- body.nodes[0] is the norm, unchanged (its statistics outputs, when it lists them, unread);
- body.nodes[1] the anchor reading the norm's result as input 0, body.nodes[2:] its epilogue steps;
- outputs: the last step's value (the anchor's, without steps) - preceded by the norm's result when something
  else reads it too (BERT's post-LN residual stream): [Y, result] or [result].

Rewrite cases:
- Norm(x, scale[, B]) -> Y; MatMul(Y, W) -> Fused[normalized](x, scale[, B], W)
- Norm -> Y; Fused[epilogue: MatMul/Gemm + steps](Y, W, operands) -> Fused[normalized](x, scale[, B], W, operands)
- ... and Y read elsewhere -> the fused node outputs Y as well.

Conditions: the norm normalizes the last axis only with float32 statistics, its scale (and B) constant with one
value per element of that axis; the reader takes Y as A exactly once (not also as an epilogue operand), has one
output, a constant 2-D weight (Gemm: A not transposed), and no other input computed from Y. With several such
readers, the first in graph order fuses. GPU builds only (the kernels are Triton).

Order: after precision (`kiln.build.builder`): the rewrites there work on the float graph's norms and epilogues
(Q/DQ placement, the norm's quantize fusion, FP16 lowering), and this fusion needs their final dtypes.
"""

from __future__ import annotations

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.rewrite import BodyInputs, Uses

NORMS = frozenset({"LayerNormalization", "RMSNormalization"})
ANCHORS = frozenset({"MatMul", "Gemm"})


def fuse_norm_gemm(graph: Graph) -> PassResult:
    uses = Uses.of(graph)
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    counts: dict[str, int] = {}
    for norm in [n for n in graph.nodes if n.op in NORMS]:
        if not _norm_ok(norm, uses):
            continue
        y = norm.outputs[0]
        reader = next((r for r in sorted(uses.readers.get(y, ()), key=lambda r: order[id(r)])
                       if _reads_as_a(r, y) and not _depends_on(r, y, norm, order)), None)
        if reader is None:
            continue
        keep = y in uses.outputs or any(r is not reader for r in uses.readers.get(y, ()))
        node = _normalized(graph, norm, reader, keep)
        at = graph.nodes.index(reader)
        graph.remove_nodes([norm, reader])
        graph.insert_node(node, at - 1)
        key = "with_norm_output" if keep else "fused"
        counts[key] = counts.get(key, 0) + 1
        # why: a reader of Y placed between the norm and the GEMM now follows the fused node; and the next norm's
        # checks (its readers, what depends on it) must see this node, not the two it replaced
        graph.toposort()
        uses = Uses.of(graph)
        order = {id(n): i for i, n in enumerate(graph.nodes)}
    return PassResult(bool(counts), counts)


def _norm_ok(norm: Node, uses: Uses) -> bool:
    """Last axis only, float32 statistics, constant per-element scale (and B), statistics outputs unread."""
    x, y = norm.inputs[0], norm.outputs[0]
    if x is None or not x.is_tensor or not x.dtype.is_float or not y.dtype.is_float or x.rank is None or x.rank < 2:
        return False
    k = x.shape[-1] if x.shape is not None else None
    axis = norm.attrs["axis"]
    if not isinstance(k, int) or axis not in (-1, x.rank - 1) or norm.attrs["stash_type"] is not DType.FLOAT32:
        return False
    for v in norm.inputs[1:]:
        if v is not None and (v.data is None or v.shape is None or [d for d in v.shape if d != 1] != [k]):
            return False
    return not any(uses.readers.get(o) or o in uses.outputs for o in norm.outputs[1:])


def _reads_as_a(r: Node, y: Value) -> bool:
    """`r` is a MatMul/Gemm (bare or an epilogue's anchor) reading y as A, only there, with a constant 2-D weight
    and one output."""
    if len(r.outputs) != 1 or sum(v is y for v in r.inputs) != 1:
        return False
    if r.op in ANCHORS:
        anchor, inputs = r, list(r.inputs)
    elif r.op == "Fused" and r.attrs["kind"] == "epilogue" and r.attrs["body"].nodes[0].op in ANCHORS:
        body: Graph = r.attrs["body"]
        anchor = body.nodes[0]
        outer = dict(zip(body.inputs, r.inputs))
        inputs = [outer.get(v, v) if v is not None else None for v in anchor.inputs]
        if any(y is outer.get(v) for n in body.nodes[1:] for v in n.inputs if v is not None):
            return False  # y is an epilogue operand too
    else:
        return False
    w = inputs[1] if len(inputs) > 1 else None
    if inputs[0] is not y or w is None or w.data is None or w.rank != 2:
        return False
    return anchor.op == "MatMul" or not anchor.attrs["transA"]


def _depends_on(r: Node, y: Value, norm: Node, order: dict[int, int]) -> bool:
    """Whether an input of `r` other than y is computed from the norm (fusing would make a cycle)."""
    start = order[id(norm)]
    stack = [v.producer for v in r.inputs if v is not None and v is not y]
    seen: set[int] = set()
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen or order.get(id(m), -1) < start:
            continue
        if m is norm:
            return True
        seen.add(id(m))
        stack.extend(v.producer for v in m.inputs if v is not None)
    return False


def _normalized(graph: Graph, norm: Node, reader: Node, keep: bool) -> Node:
    """The "normalized" Fused node for `norm` then `reader` (see the module docstring)."""
    made = BodyInputs(graph)
    take = made.take
    y = norm.outputs[0]
    y_in = Value(graph.fresh_name(f"{y.name}.inner"), y.type)
    first = Node(norm.op, [take(v) for v in norm.inputs], [y_in], dict(norm.attrs), norm.name)

    def arg(v: Value | None) -> Value | None:
        return y_in if v is y else take(v)

    if reader.op == "Fused":
        body: Graph = reader.attrs["body"]
        mapped = {b: arg(o) for b, o in zip(body.inputs, reader.inputs)}
        rest = body.nodes
        for m in rest:
            m.inputs = [mapped.get(v, v) if v is not None else None for v in m.inputs]
        result = body.outputs[0]
        name = f"{norm.name} + {body.name}"
    else:
        result = Value(graph.fresh_name(f"{reader.outputs[0].name}.inner"), reader.outputs[0].type)
        rest = [Node(reader.op, [arg(v) for v in reader.inputs], [result], dict(reader.attrs), reader.name)]
        name = f"{norm.name} + {reader.name}"
    fused = Graph(name, parent=graph)
    fused.nodes = [first, *rest]
    fused.inputs = made.inputs
    fused.outputs = [y_in, result] if keep else [result]
    for m in fused.nodes:
        for o in m.outputs:
            o.producer = m
    outs = [y, reader.outputs[0]] if keep else [reader.outputs[0]]
    node = Node("Fused", made.outer, outs, {"body": fused, "kind": "normalized"}, graph.fresh_name(name))
    for o in node.outputs:
        o.producer = node
    return node
