"""Channel scale into the conv (GPU builds, opt-in at `--opt-level 4`): a Mul of an activation x [N, C, H, W] by a
per-(image, channel) scale s [N or 1, C, 1, 1] - a squeeze-and-excitation block's output - whose product only a
1x1 conv reads becomes one Fused node of kind "scaled": body Mul(x, s) -> m, Conv(m, W[, B]) -> the conv's
epilogue steps. `triton.thin_conv` multiplies each input tile it loads by its image's scales (its programs are
patches of one image, read with Hopper's TMA: Hopper or newer GPUs), so the product never goes through memory.
Why: MobileNetV3-Large's eight SE blocks each write and read back their scaled activation (in the 2026-11-28 H100
profile at batch 128 the Muls were ~0.15 ms of 2.26, 20-30 us each at 14 x 14 x 672 channels). Opt-in until it
is timed: a scaled node has no kernel but that tactic and the reference.

Conditions, a subset of what `triton.thin_conv` takes (the tactic checks them again, with the epilogue steps its
generator renders; a scaled node no kernel but the reference takes - `PassContext.runnable`, which the builder
supplies - is split back at once): m read by that conv alone, as its input X only,
and not a graph output; the conv (with its epilogue) of one output, 2-D, 1x1, stride 1, no padding, no dilation,
one group, its weight a constant; x float16 or bfloat16 with 16-byte rows of channels (C a multiple of 8) and a
static H x W of at least 7 x 7 pixels; s of x's dtype, [N or 1, C, 1, 1].

Order: in the late list, after the epilogues are final (`extend_epilogues`), on the lowered dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import Pass, PassContext, PassResult
from kiln.passes.rewrite import Uses, fuse

MIN_PIXELS = 49
"""The smallest H x W taken (the tactic's `THIN_MIN_PIXELS`: a 1 x 1 image would be a tile of padding)."""


def channel_scale(ctx: PassContext) -> Pass:
    """The pass for `ctx`: nothing unless the build is for a Hopper or newer GPU (the thin conv's TMA form) at
    optimization level 4 or more."""
    if ctx.device != "cuda" or ctx.opt_level < 4 or ctx.capability is None or ctx.capability < (9, 0):
        return lambda graph: PassResult.of()
    return lambda graph: fuse_channel_scale(graph, ctx.runnable)


def fuse_channel_scale(graph: Graph, runnable: Callable[[Node], bool] | None = None) -> PassResult:
    """The rewrite; with `runnable` (`PassContext.runnable`), a scaled node no GPU kernel takes is split back at
    once (`unscale`): this pass checks only part of the thin conv's conditions."""
    fused = undone = 0
    uses = Uses.of(graph)
    for mul in [n for n in graph.nodes if n.op == "Mul"]:
        found = _operands(mul)
        if found is None:
            continue
        m = mul.outputs[0]
        readers = uses.readers.get(m, [])
        if m in uses.outputs or len(readers) != 1 or not _reads_as_input(readers[0], m):
            continue
        reader = readers[0]
        if reader.op == "Conv":
            node = fuse(graph, [mul, reader], "scaled", uses=uses)
        else:
            node = _prepend(graph, mul, reader, *found)
            uses = Uses.of(graph)
        if runnable is not None and not runnable(node):
            unscale(graph, node)
            uses = Uses.of(graph)
            undone += 1
            continue
        graph.layouts.pop(m.name, None)
        fused += 1
    counts = {"scaled": fused} if fused else {}
    if undone:
        counts["undone"] = undone
    return PassResult(bool(fused), counts)


def _operands(mul: Node) -> tuple[Value, Value] | None:
    """(x, s) when `mul` scales a 16-bit [N, C, H, W] activation by a [N or 1, C, 1, 1] scale of its dtype."""
    if len(mul.inputs) != 2 or any(v is None or not v.is_tensor for v in mul.inputs):
        return None
    a, b = mul.inputs
    assert a is not None and b is not None
    for x, s in ((a, b), (b, a)):
        xs, ss = x.shape, s.shape
        if xs is None or ss is None or len(xs) != 4 or len(ss) != 4 or x.dtype is not s.dtype:
            continue
        if x.dtype not in (DType.FLOAT16, DType.BFLOAT16) or mul.outputs[0].type != x.type:
            continue
        n, c, h, w = xs
        if not isinstance(c, int) or not isinstance(h, int) or not isinstance(w, int):
            continue
        if (c * 2) % 16 or h * w < MIN_PIXELS:
            continue
        if ss[1] == c and tuple(ss[2:]) == (1, 1) and ss[0] in (1, n):
            return x, s
    return None


def _conv_ok(w: Value | None, a: dict[str, Any]) -> bool:
    """A 2-D 1x1 conv's constant weight `w` and attributes `a`: one group, stride 1, no padding or dilation."""
    if w is None or w.data is None or w.shape is None or len(w.shape) != 4 or tuple(w.shape[2:]) != (1, 1):
        return False
    return (int(a.get("group", 1)) == 1 and all(int(v) == 1 for v in a.get("strides") or (1, 1))
            and all(int(v) == 1 for v in a.get("dilations") or (1, 1)) and not any(a.get("pads") or ())
            and a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID", b"NOTSET", b"VALID"))


def _reads_as_input(reader: Node, m: Value) -> bool:
    """`reader` is a 1x1 conv (bare, or anchoring an epilogue) reading m as its input X and nowhere else."""
    if reader.inputs.count(m) != 1 or len(reader.outputs) != 1:
        return False
    if reader.op == "Conv":
        return reader.inputs[0] is m and _conv_ok(reader.inputs[1] if len(reader.inputs) > 1 else None,
                                                  reader.attrs)
    if reader.op != "Fused" or reader.attrs.get("kind") != "epilogue":
        return False
    body: Graph = reader.attrs["body"]
    conv = body.nodes[0]
    inner = body.inputs[reader.inputs.index(m)]
    w = conv.inputs[1] if conv.op == "Conv" and len(conv.inputs) > 1 else None
    if conv.op != "Conv" or conv.inputs[0] is not inner or w is None or w not in body.inputs:
        return False
    if not _conv_ok(reader.inputs[body.inputs.index(w)], conv.attrs):
        return False
    return not any(inner in n.inputs for n in body.nodes[1:]) and inner not in conv.inputs[1:]


def _prepend(graph: Graph, mul: Node, reader: Node, x: Value, s: Value) -> Node:
    """`reader` (a Fused epilogue) with `mul` as the first node of its body: a "scaled" node replacing both."""
    body: Graph = reader.attrs["body"]
    m = mul.outputs[0]
    k = reader.inputs.index(m)
    inner = body.inputs[k]
    x_in, s_in = (Value(graph.fresh_name(f"{v.name}.in"), v.type) for v in (x, s))
    scale = Node("Mul", [x_in if v is x else s_in for v in mul.inputs], [inner], dict(mul.attrs), mul.name)
    inner.producer = scale
    body.nodes.insert(0, scale)
    body.inputs = [x_in, s_in, *body.inputs[:k], *body.inputs[k + 1:]]
    outer_in = [x, s, *reader.inputs[:k], *reader.inputs[k + 1:]]
    name = f"{mul.name} + {reader.name}"
    node = Node("Fused", outer_in, list(reader.outputs), {"body": body, "kind": "scaled"}, name)
    at = graph.nodes.index(reader) - 1  # where the reader was (its other inputs may be made after the Mul)
    graph.remove_nodes([mul, reader])
    graph.insert_node(node, at)
    graph.use_name(node.name)
    return node


def unscale(graph: Graph, node: Node) -> None:
    """Undo the rewrite for one "scaled" node (one no GPU kernel takes): the Mul becomes a node again, before the
    conv - bare, or anchoring the epilogue that followed it."""
    body: Graph = node.attrs["body"]
    outer = dict(zip(body.inputs, node.inputs))
    mul, conv = body.nodes[0], body.nodes[1]
    m_inner = mul.outputs[0]
    m = Value(graph.fresh_name(m_inner.name), m_inner.type)
    scale = Node("Mul", [outer.get(v, v) if v is not None else None for v in mul.inputs], [m], dict(mul.attrs),
                 mul.name)
    rest = body.nodes[1:]
    if len(rest) == 1 and body.outputs == conv.outputs:  # the conv alone: a bare node again
        conv.inputs = [m if v is m_inner else outer.get(v, v) if v is not None else None for v in conv.inputs]
        conv.outputs = list(node.outputs)
        after = conv
    else:
        used = [v for v in body.inputs if any(v in n.inputs for n in rest)]
        m_inner.producer = None  # a body input again
        body.nodes = rest
        body.inputs = [m_inner, *used]
        after = Node("Fused", [m, *(outer[v] for v in used)], list(node.outputs), {"body": body, "kind": "epilogue"},
                     node.name.split(" + ", 1)[-1])
    at = graph.nodes.index(node)
    graph.remove_nodes([node])
    graph.insert_node(scale, at)
    graph.insert_node(after, at + 1)
