"""Constant folding: a node whose inputs are all constants runs once, through the op table's reference, and its
outputs become initializers. The output values themselves turn into the initializers, so their names, dtypes
and readers (subgraphs included) stay as they were; a symbolic or unknown shape becomes the static one (but
the model's outputs keep their declared types). Rounds repeat until nothing changes: after each, types are
inferred again, so that what now has a static shape folds in the next.

Rewrite cases:
- a Constant node becomes an initializer (narrow dtypes such as int4 keep their kiln dtype; strings too);
- an integer scalar or vector computed from static dims (`Gather(Shape(x), 2)` where x is [batch, seq, 64]:
  everything `shape_values` follows; the shape-arithmetic pass does the same with the profile's static dims);
- a node whose inputs are all constants (initializers, Constants, outputs folded earlier in the same sweep):
  weight preprocessing (Cast/Transpose/Reshape/Concat... of initializers, QuantizeLinear of a weight) and
  arithmetic on constant shapes, ConstantOfShape, Range, ...; in every graph, nested bodies included;
- an If whose condition is constant is replaced by the nodes of the branch it takes (its initializers move
  along; the If's readers read the branch's outputs).

Left alone:
- random ops (RandomUniform[Like], RandomNormal[Like], Multinomial, Bernoulli, Dropout);
- DequantizeLinear: the quantization passes need the Q/DQ pairs around weights;
- nodes with subgraphs (Loop/Scan, If on a computed condition) and nodes with non-tensor inputs or outputs
  (sequences, optionals);
- large broadcasts: an output of more than BROADCAST_LIMIT elements and more than BROADCAST_RATIO times the
  elements of all inputs together (Expand, ConstantOfShape, Tile, Range, broadcasting arithmetic) is cheaper
  to compute on the fly than to store - unless it is a weight (read as a Conv/Gemm/MatMul/norm/RNN/embedding
  parameter, see WEIGHT_INPUTS): what computes a weight is always folded (the ONNX suite's light models make
  every weight with ConstantOfShape);
- a node whose reference fails (the runtime reports it) or whose result contradicts its inferred type.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.ops import OPS, RefCtx, const_value
from kiln.ir.ops.tensor import shape_values
from kiln.passes.manager import PassResult
from kiln.passes.rewrite import graphs, try_redirect
from kiln.passes.types import Dims, refine_types, substitute

BROADCAST_LIMIT = 1 << 16
BROADCAST_RATIO = 4
RANDOM = frozenset({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial",
                    "Bernoulli", "Dropout"})
NEVER = RANDOM | {"DequantizeLinear"}
MAX_ROUNDS = 8
WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}), "ConvTranspose": frozenset({1, 2}), "DeformConv": frozenset({1, 3}),
    "Gemm": frozenset({0, 1, 2}), "MatMul": frozenset({0, 1}), "BatchNormalization": frozenset({1, 2, 3, 4}),
    "InstanceNormalization": frozenset({1, 2}), "LayerNormalization": frozenset({1, 2}),
    "GroupNormalization": frozenset({1, 2}), "RMSNormalization": frozenset({1}), "PRelu": frozenset({1}),
    "Gather": frozenset({0}), "LSTM": frozenset({1, 2, 3}), "GRU": frozenset({1, 2, 3}), "RNN": frozenset({1, 2, 3}),
}
"""Input positions that hold a layer's parameters: a constant there is a weight, folded whatever its size."""
VALUE_OPS = frozenset({"Shape", "Size", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Reshape", "Flatten",
                       "Cast", "Identity", "Add", "Sub", "Mul", "Div", "ConstantOfShape", "Where"})
"""Ops whose integer output `shape_values` can follow back to shapes."""


def fold_constants(graph: Graph) -> PassResult:
    counts = {"constants": 0, "folded": 0, "branches_inlined": 0}
    for _ in range(MAX_ROUNDS):
        before = sum(counts.values())
        for g in graphs(graph):
            constants, folded = _fold(g)
            counts["constants"] += constants
            counts["folded"] += folded
        counts["branches_inlined"] += _inline_constant_ifs(graph)
        if sum(counts.values()) == before:
            break
        # Readers of new constants (or of an inlined If) may now have static shapes, so more shape values
        # fold, more If conditions become constant, ...: another round.
        refine_types(graph)
    return PassResult.of(**counts)


def _fold(g: Graph) -> tuple[int, int]:
    constants = folded = 0
    done: list[Node] = []
    weights = _weight_values(g)
    for node in g.nodes:
        if node.op == "Constant":
            if to_initializers(g, node, [_own(node.attrs["value"], [])]):
                done.append(node)
                constants += 1
        elif node.op == "Identity" and _foldable(node) and _alias(g, node):
            done.append(node)  # an alias, not a copy: tied weights stay one tensor
            folded += 1
        elif _foldable(node):
            results = _evaluate(node, any(v in weights for v in node.outputs))
            if results is not None and to_initializers(g, node, results):
                done.append(node)
                folded += 1
        elif node.op in VALUE_OPS:
            value = shape_constant(node, {})
            if value is not None and to_initializers(g, node, [value]):
                done.append(node)
                folded += 1
    g.remove_nodes(done)
    return constants, folded


def _weight_values(g: Graph) -> set[Value]:
    out: set[Value] = set()
    for n in g.nodes:
        for i in WEIGHT_INPUTS.get(n.op, ()):
            if i < len(n.inputs) and n.inputs[i] is not None:
                out.add(n.inputs[i])  # type: ignore[arg-type]
    return out


def _alias(g: Graph, node: Node) -> bool:
    src = node.inputs[0]
    return src is not None and try_redirect(g, node.outputs[0], src)


def _foldable(node: Node) -> bool:
    if node.op in NEVER or node.subgraphs():
        return False
    if not all(isinstance(v.type, TensorType) for v in node.outputs):
        return False
    return all(v is None or (isinstance(v.type, TensorType) and const_value(v) is not None) for v in node.inputs)


def shape_constant(node: Node, dims: Dims) -> torch.Tensor | None:
    """The value of a node's integer scalar or vector output computed from shapes (Shape -> Gather -> Concat
    ...), when every element is static once the symbols in `dims` are substituted; None otherwise."""
    if len(node.outputs) != 1:
        return None
    t = node.outputs[0].type
    if not isinstance(t, TensorType) or not t.dtype.is_int or t.dtype.is_narrow or t.rank not in (0, 1):
        return None
    vals = shape_values(node.outputs[0])
    if vals is None:
        return None
    ints = [substitute(d, dims) for d in vals]
    if not all(isinstance(d, int) for d in ints) or (t.rank == 0 and len(ints) != 1):
        return None
    return torch.tensor(ints[0] if t.rank == 0 else ints, dtype=t.dtype.torch)


def _numel(x: Any) -> int:
    return int(x.numel()) if isinstance(x, torch.Tensor) else int(np.size(x))


def _evaluate(node: Node, weight: bool = False) -> list[Any] | None:
    args = [None if v is None else const_value(v) for v in node.inputs]
    limit = max(BROADCAST_LIMIT, BROADCAST_RATIO * sum(_numel(a) for a in args if a is not None))
    if weight:
        limit = math.inf  # type: ignore[assignment]
    for v in node.outputs:
        t = v.type
        if isinstance(t, TensorType) and t.is_static and math.prod(int(d) for d in t.shape or ()) > limit:
            return None  # known too big before running it
    try:
        results = list(OPS[node.op].ref(RefCtx(node), args))
    except Exception:  # the runtime reports a real failure, naming the node
        return None
    if len(results) < len(node.outputs) or any(_numel(r) > limit for r in results[: len(node.outputs)]):
        return None
    return [_own(r, args) for r in results]


def _own(r: Any, args: list[Any]) -> Any:
    """r on the CPU, contiguous and sharing no memory with the inputs (a Reshape's result is a view of its
    input; weights that share memory cannot be saved as safetensors)."""
    if not isinstance(r, torch.Tensor):
        return r
    r = r.detach().cpu().contiguous()
    ptr = r.untyped_storage().data_ptr()
    shared = any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in args)
    return r.clone() if shared else r


def _fits(v: Value, r: Any) -> bool:
    t = v.type
    if not isinstance(t, TensorType):
        return False
    if t.dtype is DType.STRING:
        ok = isinstance(r, np.ndarray) and r.dtype == object
    else:
        ok = isinstance(r, torch.Tensor) and r.dtype == t.dtype.torch
    if not ok or (t.shape is not None and len(t.shape) != r.ndim):
        return False
    return t.shape is None or all(not isinstance(d, int) or d == n for d, n in zip(t.shape, r.shape))


def to_initializers(g: Graph, node: Node, results: list[Any]) -> bool:
    """Turn the node's output values into initializers holding `results` (all or none)."""
    if len(results) < len(node.outputs) or not all(_fits(v, r) for v, r in zip(node.outputs, results)):
        return False
    for v, r in zip(node.outputs, results):
        if v not in g.outputs:  # an output keeps its declared type
            v.type = TensorType(v.dtype, tuple(r.shape))
        v.data, v.folded, v.producer = r, None, None
        g.initializers[v.name] = v
    return True


# --- If with a constant condition ----------------------------------------------------------------------


def _inline_constant_ifs(graph: Graph) -> int:
    """Replace every If whose condition is constant by the nodes of the branch it takes."""
    count = 0
    for g in graphs(graph):
        i = 0
        while i < len(g.nodes):
            node = g.nodes[i]
            if node.op == "If" and _condition(node) is not None:
                _inline(g, i, node)
                count += 1
                continue  # the branch's nodes now start at i (and may hold more such Ifs)
            i += 1
    return count


def _condition(node: Node) -> bool | None:
    c = const_value(node.inputs[0])
    if not isinstance(c, torch.Tensor) or c.numel() != 1:
        return None
    return bool(c.reshape(-1)[0])


def _inline(g: Graph, i: int, node: Node) -> None:
    branch: Graph = node.attrs["then_branch" if _condition(node) else "else_branch"]
    g.initializers.update(branch.initializers)
    g.nodes[i:i + 1] = branch.nodes
    for old, new in zip(node.outputs, branch.outputs):
        if not try_redirect(g, old, new):  # a model output that the branch reads from elsewhere
            keep = Node("Identity", [new], [old], {}, g.fresh_name(f"{node.name}.out"))
            g.insert_node(keep, i + len(branch.nodes))
