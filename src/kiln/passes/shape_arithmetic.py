"""Shape arithmetic: the Shape -> Gather -> Unsqueeze -> Concat -> Reshape chains exporters emit become constants
when the dims they read are static, and otherwise constant targets that say the same thing with 0 / -1.

The pass needs the build profiles (`PassContext.static_dims`: symbols with one size in every profile), so it
is a factory: `shape_arithmetic(ctx)` returns the pass. Steps, in every graph (nested bodies included):

1. Specialize (`types.specialize`): static symbols are substituted in the types of all values (expressions
   simplify: `batch*seq` with batch = 1 is `seq`). The model's inputs and outputs keep their declared types.
2. Refine (`types.refine_types`): every node's types are inferred again, in order, and a dim (or a rank)
   that inference now knows statically replaces the symbolic or unknown one it had.
3. Rewrite, as a pattern table:
   - fold_shape_value: an integer scalar or vector computed from shapes (Shape, Size, Gather, Slice, Concat,
     Squeeze/Unsqueeze/Reshape/Flatten, Cast, Identity, Add/Sub/Mul/Div, ConstantOfShape, Where(Equal)) whose
     every element is static (via `shape_values`, with the static symbols substituted) becomes an
     initializer. Shape of a static tensor, Gather of a static dim of a dynamic tensor, a Concat of static
     parts, ... all count;
   - reshape_target: a Reshape whose target is computed (not constant) gets a constant target built from its
     input and output types: a static output dim is written as is; a symbolic dim equal to the input dim at
     the same position is 0 (copy; not with allowzero=1); one remaining symbolic dim is -1. Two or more
     symbolic dims that are not copies leave the node alone (no constant can say it);
   - expand_target: an Expand whose shape is computed gets a constant shape: a static output dim as is, a
     symbolic one equal to the aligned input dim is 1 (keep). Other symbolic dims leave the node alone;
   - slice_to_end: a Slice whose ends are computed (its starts, axes and steps constant) gets constant ends:
     a static end as is, an end equal to the sliced dim with a positive step (`x[a:x.shape[i]]`) as
     INT64_MAX. Any other symbolic end leaves the node alone.
   The computed chains left without readers are removed by dead-node elimination.

Symbolic dims are taken to be positive (as in `kiln.ir.symbolic`): a -1 target is ambiguous only for empty
tensors, which a symbolic dim never describes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kiln.ir import symbolic as sym
from kiln.ir.graph import Graph, Node, Shape, TensorType, Value
from kiln.ir.ops import const_value
from kiln.ir.ops.tensor import shape_values
from kiln.passes.constant_folding import VALUE_OPS, shape_constant, to_initializers
from kiln.passes.manager import Pass, PassContext, PassResult
from kiln.passes.pattern import Rule, apply_rules, rule
from kiln.passes.rewrite import graphs
from kiln.passes.types import Dims, refine_types, specialize, substitute

INT64_MAX = 2**63 - 1


def shape_arithmetic(ctx: PassContext) -> Pass:
    dims = dict(ctx.static_dims)

    def run(graph: Graph) -> PassResult:
        specialized = specialize(graph, dims)
        refined = refine_types(graph)
        counts = {"specialized": specialized, "refined": refined}
        rules = _rules(dims)
        for g in graphs(graph):
            counts.update(_add(counts, apply_rules(g, rules).counts))
        return PassResult.of(**counts)

    return run


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


def _shape(v: Value, dims: Dims) -> Shape | None:
    t = v.type
    if not isinstance(t, TensorType) or t.shape is None:
        return None
    return tuple(substitute(d, dims) for d in t.shape)


def _same(a: sym.Dim, b: sym.Dim) -> bool:
    return a == b or sym.equal(a, b) is True


# --- the rewrites ------------------------------------------------------------------------------------------


def _rules(dims: Dims) -> list[Rule]:
    return [
        rule(sorted(VALUE_OPS), lambda g, n, u: _fold_shape_value(g, n, dims)),
        rule("Reshape", lambda g, n, u: _reshape_target(g, n, dims)),
        rule("Expand", lambda g, n, u: _expand_target(g, n, dims)),
        rule("Slice", lambda g, n, u: _slice_to_end(g, n, dims)),
    ]


def _fold_shape_value(g: Graph, node: Node, dims: Dims) -> str | None:
    value = shape_constant(node, dims)
    if value is None or not to_initializers(g, node, [value]):
        return None
    g.remove_nodes([node])
    return "shape_values_folded"


def reshape_target(src: Sequence[sym.Dim], dst: Sequence[sym.Dim], allowzero: bool = False) -> list[int] | None:
    """A constant Reshape target taking a tensor of shape `src` to shape `dst`, or None when none exists:
    static dims as they are, symbolic dims equal to the input dim at the same position as 0 (copy), and one
    other symbolic dim as -1."""
    out: list[int] = []
    hole = False
    for i, d in enumerate(dst):
        if isinstance(d, int):
            if d == 0 and not allowzero:
                return None  # 0 would mean "copy"
            out.append(d)
        elif not allowzero and i < len(src) and _same(src[i], d):
            out.append(0)
        elif not hole:
            out.append(-1)
            hole = True
        else:
            return None
    if hole and any(d == 0 for d in dst):
        return None  # -1 next to an empty dim is ambiguous
    return out


def _target(g: Graph, node: Node, i: int, values: list[int], hint: str) -> None:
    node.inputs[i] = g.add_initializer(f"{node.name}.{hint}", torch.tensor(values, dtype=torch.int64))


def _computed(v: Value | None) -> bool:
    return v is not None and const_value(v) is None


def _reshape_target(g: Graph, node: Node, dims: Dims) -> str | None:
    if not _computed(node.inputs[1]) or node.inputs[0] is None:
        return None
    src, dst = _shape(node.inputs[0], dims), _shape(node.outputs[0], dims)
    if src is None or dst is None:
        return None
    target = reshape_target(src, dst, bool(node.attrs["allowzero"]))
    if target is None:
        return None
    _target(g, node, 1, target, "shape")
    return "reshape_targets"


def _expand_target(g: Graph, node: Node, dims: Dims) -> str | None:
    if not _computed(node.inputs[1]) or node.inputs[0] is None:
        return None
    src, dst = _shape(node.inputs[0], dims), _shape(node.outputs[0], dims)
    if src is None or dst is None or len(dst) < len(src):
        return None
    lead = len(dst) - len(src)
    target: list[int] = []
    for j, d in enumerate(dst):
        if isinstance(d, int):
            target.append(d)
        elif j >= lead and _same(src[j - lead], d):
            target.append(1)
        else:
            return None
    _target(g, node, 1, target, "shape")
    return "expand_targets"


def _slice_to_end(g: Graph, node: Node, dims: Dims) -> str | None:
    x, starts, ends = node.inputs[0], node.inputs[1], node.inputs[2]
    axes = node.inputs[3] if len(node.inputs) > 3 else None
    steps = node.inputs[4] if len(node.inputs) > 4 else None
    if x is None or starts is None or ends is None or not _computed(ends) or _computed(starts):
        return None
    if _computed(axes) or _computed(steps):
        return None
    shape = _shape(x, dims)
    vals = shape_values(ends)
    if shape is None or vals is None:
        return None
    n = len(vals)
    axis_list = _ints(axes) if axes is not None else list(range(n))
    step_list = _ints(steps) if steps is not None else [1] * n
    if len(axis_list) != n or len(step_list) != n:
        return None
    out: list[int] = []
    for e, a, st in zip(vals, axis_list, step_list):
        e = substitute(e, dims)
        if isinstance(e, int):
            out.append(e)
        elif st > 0 and -len(shape) <= a < len(shape) and _same(shape[a], e):
            out.append(INT64_MAX)
        else:
            return None
    _target(g, node, 2, out, "ends")
    return "slice_ends"


def _ints(v: Value) -> list[int]:
    c = const_value(v)
    return [int(x) for x in c.reshape(-1).tolist()]
