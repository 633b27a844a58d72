"""No-op removal: nodes that return their input unchanged are bypassed (their readers read the input), and
chains of layout ops collapse into one node. A rewrite applies only when it provably keeps the value: same
dtype, same shape (dims equal as symbolic expressions), in every graph (nested bodies included).

Rewrite cases (the pattern table at the bottom, in order):
- Identity; Dropout in inference (no training_mode, or a constant false one, or a constant ratio of 0) whose
  mask is not read;
- Cast to the input's own dtype; Cast(Cast(x: A -> B) -> C) reads x directly when A -> B is exact (every A
  value is a B value: widening ints and floats, bool to numbers) - and disappears when C is A;
- Reshape / Flatten / Squeeze / Unsqueeze whose output shape equals its input shape; two of them in a row
  (the first read only by the second) become one Reshape: with the second's target when it is a constant
  Reshape target without 0s (or with allowzero=1), else a target built from the types (static dims, 0 for a
  dim copied from the same position, one -1; see `shape_arithmetic.reshape_target`);
- Transpose with the identity permutation; Transpose(Transpose(x, p), q) -> Transpose(x, p[q]) (removed
  when that is the identity) when the inner one has no other reader; a Transpose that moves only size-1 dims
  (the other dims keep their order) becomes a Reshape;
- Expand to the input's shape; Pad with constant all-zero pads (any mode); Slice with unit steps whose
  output shape equals the input shape; Tile by constant all-one repeats; Concat / Sum / Max / Min / Mean of
  one input;
- x + 0, 0 + x, x - 0, x * 1, 1 * x, x / 1, x ** 1, x and True, x or False, where the constant's every
  element is the neutral value and the output has x's shape (a broadcast that grows x is not a no-op);
  x + 0 turns -0.0 into +0.0, which kiln accepts;
- Where with a constant condition that is all true (-> X) or all false (-> Y), when that operand already has
  the output's shape;
- Gather along axis a by constant indices that are 0, 1, ..., n-1 in order (n = the axis' static size) only
  reshapes: it becomes a Reshape to its output's static shape (and then joins the reshapes around it);
- GatherND by constant in-range indices into data of static shape is a Gather of the flattened data by
  constant linear offsets (GatherND has only a reference kernel, which a CUDA graph cannot capture; Gather has
  GPU kernels). torch.export writes `mask[arange(B)[:, None], arange(S)]`-style indexing so; those offsets are
  0, 1, ..., n-1 and the Gather rule above then leaves a Reshape.
A value that is an output of its graph is bypassed only when the replacing value can take its name
(`can_redirect`): a graph input, an outer value or another output never can.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.ops import const_value, get_op
from kiln.passes.manager import PassResult
from kiln.passes.matching import add_const, add_node
from kiln.passes.pattern import Rule, apply_rules, rule
from kiln.passes.rewrite import Uses, graphs, try_redirect
from kiln.passes.shape_arithmetic import reshape_target

RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def remove_noops(graph: Graph) -> PassResult:
    counts: dict[str, int] = {}
    for g in graphs(graph):
        for k, v in apply_rules(g, RULES).counts.items():
            counts[k] = counts.get(k, 0) + v
        g.toposort()  # the manager sorts the main graph only
    return PassResult.of(**counts)


# --- helpers ------------------------------------------------------------------------------------------------


def _bypass(g: Graph, node: Node, src: Value | None, uses: Uses, what: str) -> str | None:
    """Readers of the node's first output read `src` instead, and the node goes (its other outputs unread)."""
    if src is None or any(uses.count(v) for v in node.outputs[1:]):
        return None
    if not try_redirect(g, node.outputs[0], src):
        return None
    g.remove_nodes([node])
    return what


def _become(node: Node, op: str, inputs: list[Value | None], attrs: dict[str, Any] | None = None) -> None:
    """Turn `node` into another op in place: its outputs (names, types, readers) stay."""
    node.op, node.inputs, node.attrs = op, inputs, get_op(op).check_attrs(attrs or {}, node.name)


def _shape(v: Value | None) -> tuple[sym.Dim, ...] | None:
    if v is None or not isinstance(v.type, TensorType):
        return None
    return v.type.shape


def same_type(a: Value | None, b: Value | None) -> bool:
    """a and b have the same dtype and provably the same shape."""
    if a is None or b is None or not isinstance(a.type, TensorType) or not isinstance(b.type, TensorType):
        return False
    sa, sb = a.type.shape, b.type.shape
    if a.type.dtype != b.type.dtype or sa is None or sb is None or len(sa) != len(sb):
        return False
    return all(x == y or sym.equal(x, y) is True for x, y in zip(sa, sb))


def _const(v: Value | None) -> torch.Tensor | None:
    c = const_value(v)
    return c if isinstance(c, torch.Tensor) else None


def _ints(v: Value | None) -> list[int] | None:
    c = _const(v)
    return None if c is None else [int(x) for x in c.reshape(-1).tolist()]


def _only_reader(uses: Uses, v: Value | None, node: Node) -> bool:
    return v is not None and uses.only_reader(v) is node


# --- Identity, Dropout, Cast ------------------------------------------------------------------------------


def _identity(g: Graph, node: Node, uses: Uses) -> str | None:
    return _bypass(g, node, node.inputs[0], uses, "identity")


def _dropout(g: Graph, node: Node, uses: Uses) -> str | None:
    ratio = node.inputs[1] if len(node.inputs) > 1 else None
    training = node.inputs[2] if len(node.inputs) > 2 else None
    t, r = _const(training), _const(ratio)
    inference = training is None or (t is not None and not bool(t.reshape(-1)[0]))
    if not inference and not (r is not None and float(r.reshape(-1)[0]) == 0.0):
        return None
    return _bypass(g, node, node.inputs[0], uses, "dropout")


D = DType
_FLOAT8 = (D.FLOAT8_E4M3FN, D.FLOAT8_E4M3FNUZ, D.FLOAT8_E5M2, D.FLOAT8_E5M2FNUZ)
_EXACT: dict[DType, frozenset[DType]] = {
    D.INT8: frozenset({D.INT16, D.INT32, D.INT64, D.FLOAT16, D.BFLOAT16, D.FLOAT32, D.FLOAT64}),
    D.UINT8: frozenset({D.INT16, D.INT32, D.INT64, D.UINT16, D.UINT32, D.UINT64, D.FLOAT16, D.BFLOAT16,
                        D.FLOAT32, D.FLOAT64}),
    D.INT16: frozenset({D.INT32, D.INT64, D.FLOAT32, D.FLOAT64}),
    D.UINT16: frozenset({D.INT32, D.INT64, D.UINT32, D.UINT64, D.FLOAT32, D.FLOAT64}),
    D.INT32: frozenset({D.INT64, D.FLOAT64}),
    D.UINT32: frozenset({D.INT64, D.UINT64, D.FLOAT64}),
    D.FLOAT16: frozenset({D.FLOAT32, D.FLOAT64}),
    D.BFLOAT16: frozenset({D.FLOAT32, D.FLOAT64}),
    D.FLOAT32: frozenset({D.FLOAT64}),
    D.BOOL: frozenset({D.INT8, D.UINT8, D.INT16, D.UINT16, D.INT32, D.UINT32, D.INT64, D.UINT64, D.FLOAT16,
                       D.BFLOAT16, D.FLOAT32, D.FLOAT64}),
    **{f: frozenset({D.FLOAT16, D.BFLOAT16, D.FLOAT32, D.FLOAT64}) for f in _FLOAT8},
}


def _cast(g: Graph, node: Node, uses: Uses) -> str | None:
    x = node.inputs[0]
    if x is None or not isinstance(x.type, TensorType):
        return None
    if x.type.dtype == node.attrs["to"]:
        return _bypass(g, node, x, uses, "cast")
    p = x.producer
    if p is None or p.op != "Cast":
        return None
    src = p.inputs[0]
    if src is None or not isinstance(src.type, TensorType):
        return None
    if x.type.dtype not in _EXACT.get(src.type.dtype, ()):
        return None
    node.inputs = [src]
    if _only_reader(uses, x, node):
        g.remove_nodes([p])
    if src.type.dtype == node.attrs["to"]:
        return _bypass(g, node, src, uses, "cast") or "cast_chain"
    return "cast_chain"


# --- Reshape family, Transpose -------------------------------------------------------------------------------


def _reshape(g: Graph, node: Node, uses: Uses) -> str | None:
    x = node.inputs[0]
    if same_type(x, node.outputs[0]):
        return _bypass(g, node, x, uses, "reshape")
    p = x.producer if x is not None else None
    if p is None or p.op not in RESHAPES or not _only_reader(uses, x, node) or p.inputs[0] is None:
        return None
    target, allowzero = _own_target(node)
    if target is None:
        src, dst = _shape(p.inputs[0]), _shape(node.outputs[0])
        target = None if src is None or dst is None else reshape_target(src, dst)
    if target is None:
        return None
    shape = g.add_initializer(f"{node.name}.shape", torch.tensor(target, dtype=torch.int64))
    _become(node, "Reshape", [p.inputs[0], shape], {"allowzero": allowzero})
    g.remove_nodes([p])
    return "reshape_chain"


def _own_target(node: Node) -> tuple[list[int] | None, int]:
    """A Reshape's constant target when it does not depend on the input's shape (no 0s, or allowzero=1)."""
    if node.op != "Reshape":
        return None, 0
    t = _ints(node.inputs[1])
    allowzero = int(node.attrs["allowzero"])
    return (t, allowzero) if t is not None and (allowzero or 0 not in t) else (None, 0)


def _perm(node: Node) -> list[int] | None:
    x = node.inputs[0]
    rank = x.type.rank if x is not None and isinstance(x.type, TensorType) else None
    p = node.attrs["perm"]
    if p is None:
        return None if rank is None else list(range(rank))[::-1]
    r = len(p)
    return [a + r if a < 0 else a for a in p]


def _transpose(g: Graph, node: Node, uses: Uses) -> str | None:
    perm, x = _perm(node), node.inputs[0]
    if perm is None or x is None:
        return None
    if perm == sorted(perm):
        return _bypass(g, node, x, uses, "transpose")
    p = x.producer
    inner = _perm(p) if p is not None and p.op == "Transpose" else None
    if p is not None and inner is not None and _only_reader(uses, x, node) and len(inner) == len(perm):
        node.inputs = [p.inputs[0]]
        node.attrs = {**node.attrs, "perm": tuple(inner[i] for i in perm)}
        g.remove_nodes([p])
        return "transpose_pair"
    return _unit_transpose(g, node, perm)


def _unit_transpose(g: Graph, node: Node, perm: list[int]) -> str | None:
    src, dst = _shape(node.inputs[0]), _shape(node.outputs[0])
    if src is None or dst is None:
        return None
    moved = [a for a in perm if src[a] != 1]
    if moved != sorted(moved):
        return None
    target = reshape_target(src, dst)
    if target is None:
        return None
    shape = g.add_initializer(f"{node.name}.shape", torch.tensor(target, dtype=torch.int64))
    _become(node, "Reshape", [node.inputs[0], shape])
    return "transpose_to_reshape"


# --- Expand, Pad, Slice, Tile, one-input ops -----------------------------------------------------------------


def _expand(g: Graph, node: Node, uses: Uses) -> str | None:
    x = node.inputs[0]
    return _bypass(g, node, x, uses, "expand") if same_type(x, node.outputs[0]) else None


def _pad(g: Graph, node: Node, uses: Uses) -> str | None:
    pads = _ints(node.inputs[1])
    if pads is None or any(pads):
        return None
    return _bypass(g, node, node.inputs[0], uses, "pad")


def _slice(g: Graph, node: Node, uses: Uses) -> str | None:
    steps = node.inputs[4] if len(node.inputs) > 4 else None
    if (steps is not None and _ints(steps) is None) or any(s != 1 for s in _ints(steps) or []):
        return None
    x = node.inputs[0]
    return _bypass(g, node, x, uses, "slice") if same_type(x, node.outputs[0]) else None


def _tile(g: Graph, node: Node, uses: Uses) -> str | None:
    reps = _ints(node.inputs[1])
    if reps is None or any(r != 1 for r in reps):
        return None
    return _bypass(g, node, node.inputs[0], uses, "tile")


def _single_input(g: Graph, node: Node, uses: Uses) -> str | None:
    if len(node.inputs) != 1 or not same_type(node.inputs[0], node.outputs[0]):
        return None
    return _bypass(g, node, node.inputs[0], uses, "single_input")


# --- neutral operands ---------------------------------------------------------------------------------------

_NEUTRAL: dict[str, tuple[float | bool, bool]] = {
    "Add": (0, True), "Sub": (0, False), "Mul": (1, True), "Div": (1, False), "Pow": (1, False),
    "And": (True, True), "Or": (False, True),
}
"""op -> (neutral value, whether it may also be the left operand)."""


def _all_equal(c: torch.Tensor | None, value: float | bool) -> bool:
    if c is None or c.numel() == 0 or c.dtype in (torch.complex64, torch.complex128):
        return False
    if c.dtype == torch.bool:
        return bool((c == bool(value)).all())
    return bool((c.double() == float(value)).all())


def _neutral(g: Graph, node: Node, uses: Uses) -> str | None:
    value, commutes = _NEUTRAL[node.op]
    a, b = node.inputs[0], node.inputs[1]
    out = node.outputs[0]
    if _all_equal(_const(b), value) and same_type(a, out):
        return _bypass(g, node, a, uses, "neutral_operand")
    if commutes and _all_equal(_const(a), value) and same_type(b, out):
        return _bypass(g, node, b, uses, "neutral_operand")
    return None


def _where(g: Graph, node: Node, uses: Uses) -> str | None:
    c = _const(node.inputs[0])
    if c is None or c.numel() == 0:
        return None
    pick = node.inputs[1] if bool(c.all()) else node.inputs[2] if not bool(c.any()) else None
    return _bypass(g, node, pick, uses, "where") if same_type(pick, node.outputs[0]) else None


def _gather_in_order(g: Graph, node: Node, uses: Uses) -> str | None:
    """Gather(data, [0, 1, ..., n-1]) along an axis of n: every element stays where it is; a Reshape."""
    data, idx = node.inputs[0], node.inputs[1]
    shape, out = _shape(data), _shape(node.outputs[0])
    c = _const(idx)
    if shape is None or out is None or c is None or not all(isinstance(d, int) for d in out):
        return None
    axis = int(node.attrs["axis"]) % len(shape) if shape else 0
    n = shape[axis] if shape else None
    if not isinstance(n, int) or c.numel() != n or c.dtype.is_floating_point:
        return None
    if not torch.equal(c.reshape(-1).to(torch.int64), torch.arange(n)):
        return None
    target = g.add_initializer(f"{node.name}.shape", torch.tensor(list(out), dtype=torch.int64))
    _become(node, "Reshape", [data, target], {"allowzero": 0})
    return "gather_in_order"


def _gathernd_constant(g: Graph, node: Node, uses: Uses) -> str | None:
    """GatherND(data, constant indices) -> Gather(Reshape(data, [N, *rest]), constant linear offsets)."""
    data, idx = node.inputs[0], node.inputs[1]
    shape, c = _shape(data), _const(idx)
    if shape is None or c is None or c.dim() == 0 or c.dtype.is_floating_point or c.dtype == torch.bool:
        return None
    if not all(isinstance(d, int) for d in shape):
        return None
    shape = tuple(int(d) for d in shape)
    b, k = int(node.attrs["batch_dims"]), int(c.shape[-1])
    if b + k > len(shape) or tuple(c.shape[:b]) != tuple(shape[:b]):
        return None
    dims = [int(d) for d in shape[b:b + k]]
    size = torch.tensor(dims, dtype=torch.int64)
    ci = c.to(torch.int64)
    ci = torch.where(ci < 0, ci + size, ci)
    if bool(((ci < 0) | (ci >= size)).any()):
        return None  # out of range: the runtime's kernel names the error
    strides = torch.tensor([math.prod(dims[j + 1:]) for j in range(k)], dtype=torch.int64)
    lin = (ci * strides).sum(-1)
    nb = math.prod(int(d) for d in shape[:b])
    lin = lin + torch.arange(nb, dtype=torch.int64).reshape(*shape[:b], *([1] * (lin.dim() - b))) * math.prod(dims)
    target = add_const(g, f"{node.name}.rows", torch.tensor([nb * math.prod(dims), *shape[b + k:]], dtype=torch.int64))
    rows = add_node(g, node, "Reshape", [data, target])[0]
    _become(node, "Gather", [rows, add_const(g, f"{node.name}.offsets", lin)], {"axis": 0})
    return "gathernd_constant"


RULES: list[Rule] = [
    rule("Identity", _identity),
    rule("Dropout", _dropout),
    rule("Cast", _cast),
    rule(RESHAPES, _reshape),
    rule("Transpose", _transpose),
    rule("Expand", _expand),
    rule("Pad", _pad),
    rule("Slice", _slice),
    rule("Tile", _tile),
    rule(("Concat", "Sum", "Max", "Min", "Mean"), _single_input),
    rule(tuple(_NEUTRAL), _neutral),
    rule("Where", _where),
    rule("Gather", _gather_in_order),
    rule("GatherND", _gathernd_constant),
]
