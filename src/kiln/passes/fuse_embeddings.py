"""Embedding fusion (GPU builds): lookups summed and normalized become one Fused node of kind "embedding".

A BERT-style model starts with

    word = Gather(word_table, input_ids); kind = Gather(type_table, token_type_ids)
    LayerNormalization(word + kind + position_rows, scale, B)

- two lookups, a pointwise sum and a norm: four kernels at batch 1 (launches, each a few microseconds) and four
passes over the [batch, seq, hidden] rows at large batches. As one node, one kernel does it (`triton.embedding`):
a program per token reads its rows from each table, adds the other terms, normalizes the sum in float32 and writes
the result once.

Rewrite case: a LayerNormalization over the last axis with float32 statistics, a constant scale (and B) of one
value per element of that axis, whose input X is a sum: a tree of Adds (each read only by the next) whose terms are
- lookups: Gather along axis 0 of a constant 2-D table by runtime int32/int64 indices (read only by the tree), at
  least one of them;
- other terms: constants or computed values whose shape is a suffix of X's after leading 1s ([1, seq, hidden],
  [seq, hidden], [hidden]: the same rows for every batch) or X's shape itself;
all of one float dtype, X's, with a static hidden size. When X is read elsewhere too (GPT-2's residual stream
starts with it) the node outputs it as well: [X, the norm's result]. GPU builds only (the kernel is Triton). In the
patterns section of the pipeline: after norm recognition, before epilogue and pointwise fusion take the Adds.
"""

from __future__ import annotations

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.ops import const_value
from kiln.passes.manager import Pass, PassContext, PassResult
from kiln.passes.rewrite import Uses, fuse, graphs

MAX_TERMS = 8
"""Terms a fused sum takes at most (the kernel's source has a line per term)."""


def fuse_embeddings(ctx: PassContext) -> Pass:
    return lambda graph: rewrite(graph) if ctx.device == "cuda" else PassResult.of()


def rewrite(graph: Graph) -> PassResult:
    count = 0
    for g in graphs(graph):
        uses = Uses.of(g)
        for norm in [n for n in g.nodes if n.op == "LayerNormalization"]:
            region = _region(norm, uses)
            if region is not None:
                fuse(g, region, "embedding", uses=uses)
                count += 1
    return PassResult.of(embeddings=count)


def _shape(v: Value | None) -> tuple | None:
    return v.type.shape if v is not None and isinstance(v.type, TensorType) else None


def _region(norm: Node, uses: Uses) -> list[Node] | None:
    """The nodes of a fusable embedding ending at `norm` (lookups, Adds, the norm), or None."""
    x = norm.inputs[0]
    shape = _shape(x)
    if x is None or shape is None or not shape or not isinstance(shape[-1], int) or x.producer is None:
        return None
    if x.dtype not in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16) or norm.attrs["stash_type"] is not DType.FLOAT32:
        return None
    if norm.attrs["axis"] not in (-1, len(shape) - 1):
        return None
    if any(uses.readers.get(v) or v in uses.outputs for v in norm.outputs[1:]):
        return None  # the statistics outputs are not made by the kernel
    for p in norm.inputs[1:]:
        c = const_value(p) if p is not None else None
        if p is not None and (c is None or tuple(c.shape) != (shape[-1],)):
            return None
    adds: list[Node] = []
    terms: list[Value] = []
    if not _sum(x, uses, adds, terms) or not adds or len(terms) > MAX_TERMS:
        return None
    lookups = [t.producer for t in terms if _lookup(t, uses, shape)]
    if not lookups or not all(t.dtype is x.dtype for t in terms):
        return None
    if not all(t.producer in lookups or _broadcast_rows(_shape(t), shape) for t in terms):
        return None
    return [*lookups, *adds, norm]  # type: ignore[list-item]


def _sum(v: Value, uses: Uses, adds: list[Node], terms: list[Value]) -> bool:
    """Collect the Add tree computing `v` (each Add read only by the tree) and its terms; False if `v` is no Add."""
    p = v.producer
    if p is None or p.op != "Add" or len(adds) > MAX_TERMS:
        return False
    adds.append(p)
    for operand in p.inputs:
        if operand is None:
            return False
        q = operand.producer
        if q is not None and q.op == "Add" and uses.only_reader(operand) is p \
                and _same(_shape(operand), _shape(v)):
            if not _sum(operand, uses, adds, terms):
                return False
        else:
            terms.append(operand)
    return True


def _lookup(t: Value, uses: Uses, shape: tuple) -> bool:
    """A Gather along axis 0 of a constant 2-D table by runtime integer indices, read only by the sum, making the
    sum's shape."""
    g = t.producer
    if g is None or g.op != "Gather" or uses.only_reader(t) is None or int(g.attrs["axis"]) != 0:
        return False
    table, ids = g.inputs[0], g.inputs[1]
    if table is None or ids is None or const_value(table) is None or const_value(ids) is not None:
        return False
    ts = _shape(table)
    return ts is not None and len(ts) == 2 and ts[1] == shape[-1] and ids.dtype in (DType.INT64, DType.INT32) \
        and _same(_shape(t), shape)


def _same(a: tuple | None, b: tuple | None) -> bool:
    """Provably the same shape."""
    return a is not None and b is not None and len(a) == len(b) \
        and all(x == y or sym.equal(x, y) is True for x, y in zip(a, b))


def _broadcast_rows(small: tuple | None, big: tuple) -> bool:
    """`small` is `big` itself, or, after leading 1s, a suffix of it: the same rows for every leading index."""
    if small is None or len(small) > len(big):
        return False
    if _same(small, big):
        return True
    lead = 0
    while lead < len(small) - 1 and small[lead] == 1:
        lead += 1
    tail = small[lead:]
    return bool(tail) and _same(tail, big[len(big) - len(tail):]) and all(isinstance(d, int) for d in tail)
