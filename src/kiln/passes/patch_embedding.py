"""Patch embeddings as a GEMM that writes token rows (GPU builds).

A vision transformer embeds its image with a Conv whose windows tile it (kernel = stride, no padding), then
flattens the pixels and swaps the axes to get one row per patch:

    Conv(x [N, C, H, W], w [O, C, kh, kw], b) -> [N, O, OH, OW]
    Reshape -> [N, O, OH*OW]
    Transpose(perm [0, 2, 1]) -> [N, OH*OW, O]

With non-overlapping windows the conv is a GEMM of the patches (a pure rearrangement of x) by the weight, and
its rows come out in the order the Transpose wants. Rewritten as

    Reshape(x, [-1, C, OH, kh, OW, kw]) -> Transpose(perm [0, 2, 4, 1, 3, 5]) -> Reshape([-1, OH*OW, C*kh*kw])
    MatMul(., w as [C*kh*kw, O]) -> Add(b) -> [N, OH*OW, O]

the graph copies x once into patch rows and runs one GEMM with the bias in its epilogue; the conv's output never
exists in [N, O, OH, OW] order, so the copy to it and the Transpose's copy back are gone (on ViT-B/16 at batch 1 an
H200 ran the stem as five kernels: input cast, patch copy, GEMM, copy to NCHW, transpose copy; now three).

Rewrite case: a 2-D Conv with kernel = strides, no padding, dilations 1, one group, a constant weight,
H and W multiples of the kernel, whose only reader is a Reshape to [N, O, OH*OW] whose only reader is a Transpose
with perm [0, 2, 1] (the conv output and the reshape no graph outputs). GPU builds only (on the CPU the conv has
its own kernel). Before epilogue fusion, so the bias joins the GEMM.
"""

from __future__ import annotations

import torch

from kiln.ir.graph import Graph, Node
from kiln.passes.manager import Pass, PassContext, PassResult
from kiln.passes.matching import add_const, add_node, const, same_dim, sole_reader
from kiln.passes.rewrite import Uses, graphs, redirect


def patch_embedding(ctx: PassContext) -> Pass:
    return lambda graph: rewrite(graph) if ctx.device == "cuda" else PassResult.of()


def rewrite(graph: Graph) -> PassResult:
    count = 0
    for g in graphs(graph):
        uses = Uses.of(g)
        for conv in [n for n in g.nodes if n.op == "Conv"]:
            if _rewrite(g, conv, uses):
                count += 1
                uses = Uses.of(g)
    return PassResult.of(patch_embeddings=count)


def _rewrite(g: Graph, conv: Node, uses: Uses) -> bool:
    found = _patches(conv)
    if found is None:
        return False
    kh, kw = found
    x, y = conv.inputs[0], conv.outputs[0]
    w = const(conv.inputs[1])
    b = conv.inputs[2] if len(conv.inputs) > 2 else None  # [O]: added to the GEMM's rows as it is
    if x is None or w is None or x.shape is None or y.shape is None or len(x.shape) != 4 or len(y.shape) != 4:
        return False
    dims = (*x.shape[1:], *y.shape[1:])
    if not all(isinstance(d, int) for d in dims):
        return False
    c, h, wd, o, oh, ow = (int(d) for d in dims)
    if h != oh * kh or wd != ow * kw:
        return False
    flat = sole_reader(uses, y, "Reshape")
    if flat is None or flat.outputs[0].shape is None:
        return False
    fs = flat.outputs[0].shape
    if len(fs) != 3 or not same_dim(fs[0], y.shape[0]) or fs[1] != o or fs[2] != oh * ow:
        return False
    swap = sole_reader(uses, flat.outputs[0], "Transpose")
    if swap is None or list(swap.attrs.get("perm") or ()) != [0, 2, 1]:
        return False
    at = swap  # the new nodes go where the Transpose was: x and the constants are computed by then
    shape6 = add_const(g, f"{conv.name}/patch_shape", torch.tensor([-1, c, oh, kh, ow, kw], dtype=torch.int64))
    (grid,) = add_node(g, at, "Reshape", [x, shape6], name=f"{conv.name}/patch_grid")
    (rows,) = add_node(g, at, "Transpose", [grid], {"perm": [0, 2, 4, 1, 3, 5]}, name=f"{conv.name}/patches")
    shape3 = add_const(g, f"{conv.name}/patch_rows", torch.tensor([-1, oh * ow, c * kh * kw], dtype=torch.int64))
    (cols,) = add_node(g, at, "Reshape", [rows, shape3], name=f"{conv.name}/patch_rows")
    weight = add_const(g, f"{conv.name}/weight_kn", w.reshape(w.shape[0], -1).t().contiguous())
    (out,) = add_node(g, at, "MatMul", [cols, weight], name=f"{conv.name}/gemm")
    if b is not None:
        (out,) = add_node(g, at, "Add", [out, b], name=f"{conv.name}/bias")
    redirect(g, swap.outputs[0], out)
    g.remove_nodes([swap, flat, conv])
    return True


def _patches(conv: Node) -> tuple[int, int] | None:
    """(kh, kw) for a 2-D conv whose windows tile its input without overlap, else None."""
    w = const(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if w is None or w.dim() != 4:
        return None
    kh, kw = int(w.shape[2]), int(w.shape[3])
    at = conv.attrs
    if at.get("group", 1) != 1 or at.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    if list(at.get("strides") or [1, 1]) != [kh, kw] or list(at.get("dilations") or [1, 1]) != [1, 1]:
        return None
    if any(at.get("pads") or [0, 0, 0, 0]):
        return None
    shape = at.get("kernel_shape")
    if shape is not None and list(shape) != [kh, kw]:
        return None
    return kh, kw
