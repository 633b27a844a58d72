"""The op table's machinery: attribute schemas, op definitions, inference and reference contexts.

An op entry (`OpDef`) holds everything kiln knows about one op: its inputs and outputs, typed attributes with
defaults, a shape/dtype inference function and a reference implementation on torch tensors. The CPU reference
executor, constant folding and the tests all go through these entries; nothing else defines op semantics.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, OptionalType, SequenceType, Shape, TensorType, Value, ValueType
from kiln.utils.errors import GraphError, KilnError, ShapeError, UnsupportedError
from kiln.utils.registry import Registry

if TYPE_CHECKING:
    pass


class AttrKind(enum.Enum):
    INT = "int"
    FLOAT = "float"
    STRING = "string"
    INTS = "ints"
    FLOATS = "floats"
    STRINGS = "strings"
    TENSOR = "tensor"
    GRAPH = "graph"
    DTYPE = "dtype"
    TYPE = "type"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Attr:
    """One attribute's schema. `default=None` means the attribute may be absent (and reads as None)."""

    kind: AttrKind
    default: Any = REQUIRED
    choices: tuple[Any, ...] | None = None
    doc: str = ""


def _norm_attr(kind: AttrKind, v: Any) -> Any:
    k = AttrKind
    if kind is k.INT:
        if isinstance(v, (bool, int, np.integer)):
            return int(v)
    elif kind is k.FLOAT:
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            return float(v)
    elif kind is k.STRING:
        if isinstance(v, bytes):
            return v.decode("utf-8")
        if isinstance(v, str):
            return v
    elif kind is k.INTS:
        if isinstance(v, (list, tuple)) and all(isinstance(x, (int, np.integer)) for x in v):
            return tuple(int(x) for x in v)
    elif kind is k.FLOATS:
        if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, np.floating)) for x in v):
            return tuple(float(x) for x in v)
    elif kind is k.STRINGS:
        if isinstance(v, (list, tuple)):
            return tuple(x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in v)
    elif kind is k.TENSOR:
        if isinstance(v, (torch.Tensor, np.ndarray)):
            return v
    elif kind is k.GRAPH:
        if isinstance(v, Graph):
            return v
    elif kind is k.DTYPE:
        if isinstance(v, DType):
            return v
    elif kind is k.TYPE:
        if isinstance(v, (TensorType, SequenceType, OptionalType)):
            return v
    raise TypeError(f"expected a {kind.value}, got {type(v).__name__} {v!r}")


def _parse_params(spec: Sequence[str]) -> tuple[tuple[str, ...], int, int | None]:
    """'X', 'B?' (optional), 'inputs*' (variadic, zero or more), 'inputs+' (one or more) -> names, min, max."""
    names, lo, hi = [], 0, 0
    for i, s in enumerate(spec):
        if s.endswith(("*", "+")):
            if i != len(spec) - 1:
                raise ValueError(f"variadic parameter {s} must be last")
            names.append(s[:-1])
            lo += s.endswith("+")
            return tuple(names), lo, None
        if s.endswith("?"):
            names.append(s[:-1])
        else:
            names.append(s)
            lo = i + 1
        hi += 1
    return tuple(names), lo, hi


InferFn = Callable[["InferCtx"], Sequence[ValueType]]
RefFn = Callable[["RefCtx", list[Any]], Sequence[Any]]


@dataclass
class OpDef:
    """One entry of the op table."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Attr]
    infer: InferFn
    ref: RefFn
    doc: str = ""
    min_inputs: int = field(init=False)
    max_inputs: int | None = field(init=False)
    min_outputs: int = field(init=False)
    max_outputs: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.input_names, self.min_inputs, self.max_inputs = _parse_params(self.inputs)
        self.output_names, self.min_outputs, self.max_outputs = _parse_params(self.outputs)

    def check_attrs(self, attrs: dict[str, Any], node_name: str = "") -> dict[str, Any]:
        """Validate and normalize attributes, filling defaults. Raises UnsupportedError naming the attribute."""
        out: dict[str, Any] = {}
        for key, val in attrs.items():
            spec = self.attrs.get(key)
            if spec is None:
                raise UnsupportedError(
                    f"attribute '{key}' is not supported (kiln's {self.name} knows: "
                    f"{', '.join(self.attrs) or 'none'})",
                    op=self.name, node=node_name or None,
                )
            if val is None:
                if spec.default is REQUIRED:
                    raise UnsupportedError(f"attribute '{key}' is required", op=self.name, node=node_name or None)
                out[key] = spec.default
                continue
            try:
                v = _norm_attr(spec.kind, val)
            except TypeError as e:
                raise UnsupportedError(f"attribute '{key}': {e}", op=self.name, node=node_name or None) from None
            if spec.choices is not None and v not in spec.choices:
                raise UnsupportedError(
                    f"attribute {key}={v!r} is not supported (supported: {', '.join(map(repr, spec.choices))})",
                    op=self.name, node=node_name or None,
                )
            out[key] = v
        for key, spec in self.attrs.items():
            if key not in out:
                if spec.default is REQUIRED:
                    raise UnsupportedError(f"attribute '{key}' is required", op=self.name, node=node_name or None)
                out[key] = spec.default
        return out

    def default_output_count(self, node: Node) -> int:
        return self.min_outputs if self.max_outputs is None else self.max_outputs


OPS: Registry[OpDef] = Registry("op")


def register(
    name: str,
    *,
    inputs: Sequence[str],
    outputs: Sequence[str],
    infer: InferFn,
    ref: RefFn,
    attrs: dict[str, Attr] | None = None,
    doc: str = "",
) -> OpDef:
    """Add an op to the table."""
    return OPS.add(name, OpDef(name, tuple(inputs), tuple(outputs), dict(attrs or {}), infer, ref, doc))


# --- inference ----------------------------------------------------------------------------------------


class InferCtx:
    """What an op's inference function sees: the node, its input types, constant inputs, and fresh dims."""

    def __init__(self, node: Node, graph: Graph, n_outputs: int) -> None:
        self.node = node
        self.graph = graph
        self.attrs = node.attrs
        self.n_outputs = n_outputs

    @property
    def n_inputs(self) -> int:
        return len(self.node.inputs)

    def has(self, i: int) -> bool:
        return i < len(self.node.inputs) and self.node.inputs[i] is not None

    def value(self, i: int) -> Value:
        v = self.node.inputs[i] if i < len(self.node.inputs) else None
        if v is None:
            raise self.error(f"input {i} is required")
        return v

    def type(self, i: int) -> ValueType:
        return self.value(i).type

    def tensor(self, i: int) -> TensorType:
        t = self.type(i)
        if not isinstance(t, TensorType):
            raise self.error(f"input {i} must be a tensor, got {t}")
        return t

    def dtype(self, i: int) -> DType:
        return self.tensor(i).dtype

    def shape(self, i: int) -> Shape | None:
        return self.tensor(i).shape

    def rank(self, i: int) -> int | None:
        return self.tensor(i).rank

    def const(self, i: int) -> Any:
        """The constant value of input i (a torch tensor, or numpy array for strings), or None if not constant."""
        if not self.has(i):
            return None
        return const_value(self.node.inputs[i])

    def const_ints(self, i: int) -> list[int] | None:
        c = self.const(i)
        if c is None or not isinstance(c, torch.Tensor):
            return None
        return [int(x) for x in c.reshape(-1).tolist()]

    def fresh(self, hint: str = "d") -> str:
        return self.graph.fresh_dim(hint)

    def fresh_shape(self, rank: int | None, hint: str = "d") -> Shape | None:
        return None if rank is None else tuple(self.fresh(hint) for _ in range(rank))

    def error(self, msg: str) -> ShapeError:
        return ShapeError(f"node '{self.node.name}' ({self.node.op}): {msg}")

    def axis(self, axis: int, rank: int | None, *, extra: int = 0) -> int:
        """Normalize a possibly negative axis against rank (+extra for ops that insert an axis)."""
        if rank is None:
            if axis < 0:
                raise self.error(f"axis {axis} needs a known rank")
            return axis
        r = rank + extra
        if not -r <= axis < r:
            raise self.error(f"axis {axis} is out of range for rank {rank}")
        return axis + r if axis < 0 else axis


def const_value(v: Value | None) -> Any:
    """The value of `v` when it is known while building the graph: an initializer, a Constant, or a small
    value folded from constant inputs (see `fold_small_constants`). None otherwise."""
    if v is None:
        return None
    if v.data is not None:
        return v.data
    if v.folded is not None:
        return v.folded
    p = v.producer
    if p is not None and p.op == "Constant":
        return p.attrs.get("value")
    return None


FOLD_MAX_ELEMENTS = 1 << 16
"""Inputs and outputs larger than this are not precomputed: folding here serves inference (shape tensors,
pads, scales), not weight preprocessing, which is the constant-folding pass's job."""
_RANDOM = frozenset({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial",
                     "Bernoulli", "Dropout"})


def fold_small_constants(node: Node) -> None:
    """Precompute the outputs of a node whose inputs are all small constants (Value.folded)."""
    if node.op in _RANDOM or node.op == "Constant" or node.subgraphs():
        return
    args: list[Any] = []
    for v in node.inputs:
        c = const_value(v)
        if v is not None and c is None:
            return
        if isinstance(c, torch.Tensor) and c.numel() > FOLD_MAX_ELEMENTS:
            return
        args.append(c)
    try:
        results = list(OPS[node.op].ref(RefCtx(node), args))
    except Exception:  # folding only helps inference; a real failure surfaces when the graph runs
        return
    for v, r in zip(node.outputs, results):
        t = v.type
        if (isinstance(t, TensorType) and t.dtype is not DType.STRING and isinstance(r, torch.Tensor)
                and r.dtype == t.dtype.torch and r.numel() <= FOLD_MAX_ELEMENTS):
            v.folded = r


def infer_node(node: Node, graph: Graph, n_outputs: int) -> list[ValueType]:
    opdef = OPS[node.op]
    n_in = len(node.inputs)
    if n_in < opdef.min_inputs or (opdef.max_inputs is not None and n_in > opdef.max_inputs):
        raise GraphError(
            f"node '{node.name}' ({node.op}): takes {opdef.min_inputs}"
            f"{'+' if opdef.max_inputs is None else '..' + str(opdef.max_inputs)} inputs, got {n_in}"
        )
    for i, v in enumerate(node.inputs):
        if v is None and i < len(opdef.inputs) and not opdef.inputs[i].endswith(("?", "*")):
            raise GraphError(f"node '{node.name}' ({node.op}): required input {opdef.input_names[i]} is missing")
    if n_outputs < 1 or (opdef.max_outputs is not None and n_outputs > opdef.max_outputs):
        raise GraphError(f"node '{node.name}' ({node.op}): cannot have {n_outputs} outputs")
    ctx = InferCtx(node, graph, n_outputs)
    try:
        types = list(opdef.infer(ctx))
    except KilnError:
        raise
    except Exception as e:  # an inference bug must still name the node
        raise ShapeError(f"node '{node.name}' ({node.op}): shape inference failed: {type(e).__name__}: {e}") from e
    if len(types) < n_outputs:
        raise GraphError(f"node '{node.name}' ({node.op}): inference gave {len(types)} outputs, {n_outputs} needed")
    return types[:n_outputs]


# --- reference execution ------------------------------------------------------------------------------


class RefCtx:
    """What a reference implementation sees besides its inputs."""

    def __init__(self, node: Node, runner: Callable[[Graph, list[Any]], list[Any]] | None = None) -> None:
        self.node = node
        self.attrs = node.attrs
        self._runner = runner

    def out_type(self, i: int = 0) -> ValueType:
        return self.node.outputs[i].type

    def out_dtype(self, i: int = 0) -> DType:
        return self.node.outputs[i].dtype

    @property
    def n_outputs(self) -> int:
        return len(self.node.outputs)

    def run_graph(self, graph: Graph, inputs: list[Any]) -> list[Any]:
        """Run a subgraph (If/Loop/Scan bodies) with the given input values, in the current scope."""
        if self._runner is None:
            raise RuntimeError("this context cannot run subgraphs")
        return self._runner(graph, inputs)


def run_nodes(nodes: Iterable[Node], env: dict[Value, Any], device: torch.device | None = None,
              note: Callable[[Value, Any], None] | None = None) -> dict[Value, Any]:
    """Evaluate `nodes` in order through their references (no subgraphs). `env` holds the values known so far
    and receives every output; a value missing from it is a constant (its data, or its import-time fold), moved
    to `device`. `note(value, result)` sees each output as it is made. Returns `env`."""
    for n in nodes:
        args = [None if v is None else value_of(v, env, device) for v in n.inputs]
        for v, r in zip(n.outputs, OPS[n.op].ref(RefCtx(n), args)):
            env[v] = r
            if note is not None:
                note(v, r)
    return env


def value_of(v: Value, env: Mapping[Value, Any], device: torch.device | None = None) -> Any:
    """`v`'s value in `env`, else its constant (data, or import-time fold) on `device`."""
    if v in env:
        return env[v]
    d = v.data if v.data is not None else v.folded
    return d.to(device) if isinstance(d, torch.Tensor) and device is not None and d.device != device else d


# --- shared inference helpers -------------------------------------------------------------------------


def broadcast_shapes(ctx: InferCtx, *shapes: Shape | None) -> Shape | None:
    """Numpy-style broadcasting of (possibly symbolic) shapes; raises when static dims disagree."""
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes if s is not None), default=0)
    out: list[sym.Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if s is not None and len(s) - rank + i >= 0]
        out.append(broadcast_dim(ctx, dims))
    return tuple(out)


def broadcast_dim(ctx: InferCtx, dims: Sequence[sym.Dim]) -> sym.Dim:
    non_one = [d for d in dims if d != 1]
    if not non_one:
        return 1
    static = {d for d in non_one if isinstance(d, int)}
    if len(static) > 1:
        raise ctx.error(f"cannot broadcast dims {', '.join(map(str, dims))}")
    if static:
        return static.pop()
    first = non_one[0]
    if all(d == first for d in non_one):
        return first
    # Differing symbols: each is 1 or the common size; the result is their maximum.
    return sym._from_sym(_max_expr(non_one))


def _max_expr(dims: Sequence[sym.Dim]) -> Any:
    import sympy

    return sympy.Max(*[sym._to_sym(d) for d in dims])


def same_as(i: int = 0) -> InferFn:
    """Output 0 has the type of input i."""
    return lambda ctx: [ctx.type(i)]


def tensor(dtype: DType, shape: Shape | None) -> TensorType:
    return TensorType(dtype, shape)
