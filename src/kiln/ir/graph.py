"""The IR: values (typed edges), nodes (op applications) and graphs (with nested subgraphs).

Shape and dtype live on the edge (`Value`), not on the node. A node's attributes are typed by its op's entry in
the op table (`kiln.ir.ops`); `Graph.add` checks them and infers the output types through the same table.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.ir.dtype import DType
from kiln.ir.symbolic import Dim
from kiln.utils.errors import GraphError

if TYPE_CHECKING:
    from kiln.ir.ops.base import OpDef

Shape = tuple[Dim, ...]


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: Shape | None = None
    """None when even the rank is unknown."""

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def __str__(self) -> str:
        if self.shape is None:
            return f"{self.dtype}[?]"
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class SequenceType:
    elem: ValueType

    def __str__(self) -> str:
        return f"seq<{self.elem}>"


@dataclass(frozen=True)
class OptionalType:
    elem: ValueType

    def __str__(self) -> str:
        return f"optional<{self.elem}>"


ValueType = TensorType | SequenceType | OptionalType
Constant = torch.Tensor | np.ndarray
"""A constant payload: a torch tensor, or a numpy object array for strings."""


class Value:
    """A typed edge: produced by at most one node (or a graph input / initializer), read by any number."""

    __slots__ = ("data", "folded", "name", "producer", "type")

    def __init__(self, name: str, type: ValueType, data: Constant | None = None) -> None:
        self.name = name
        self.type = type
        self.data = data
        """The payload of an initializer (a graph constant)."""
        self.folded: Constant | None = None
        """A small value precomputed at graph-building time because every input of its producer was constant.
        Inference reads it (a Reshape whose shape is computed from constants still gets a static shape); it is
        a cache, not part of the graph: the producer node stays until a pass folds it."""
        self.producer: Node | None = None

    @staticmethod
    def tensor(name: str, dtype: DType, shape: Sequence[Dim] | None) -> Value:
        return Value(name, TensorType(dtype, None if shape is None else tuple(shape)))

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.type, TensorType)

    @property
    def dtype(self) -> DType:
        if not isinstance(self.type, TensorType):
            raise GraphError(f"value '{self.name}' is a {self.type}, not a tensor")
        return self.type.dtype

    @property
    def shape(self) -> Shape | None:
        if not isinstance(self.type, TensorType):
            raise GraphError(f"value '{self.name}' is a {self.type}, not a tensor")
        return self.type.shape

    @property
    def rank(self) -> int | None:
        s = self.shape
        return None if s is None else len(s)

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(eq=False)
class Node:
    """One op application. `inputs` may hold None for an omitted optional input."""

    op: str
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def opdef(self) -> OpDef:
        from kiln.ir.ops import get_op

        return get_op(self.op)

    def subgraphs(self) -> list[Graph]:
        out: list[Graph] = []
        for v in self.attrs.values():
            if isinstance(v, Graph):
                out.append(v)
            elif isinstance(v, tuple) and v and isinstance(v[0], Graph):
                out.extend(v)
        return out

    def __repr__(self) -> str:
        return f"Node({self.name or '?'}: {self.op})"


class _Namer:
    """Unique names for values, nodes and fresh symbolic dims, shared by a graph and all its subgraphs."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.reserved: set[str] = set()
        self.counter = itertools.count()

    def fresh(self, hint: str, *, claim: bool = False) -> str:
        """`hint` if free, else a numbered variant. Reserved names go only to a caller that claims them."""
        hint = hint or "v"
        if hint not in self.used and (claim or hint not in self.reserved):
            self.used.add(hint)
            self.reserved.discard(hint)
            return hint
        while True:
            name = f"{hint}_{next(self.counter)}"
            if name not in self.used and name not in self.reserved:
                self.used.add(name)
                return name


class Graph:
    """A graph of nodes in topological order. Subgraphs (If/Loop/Scan bodies) may read values of enclosing graphs."""

    def __init__(self, name: str = "main", parent: Graph | None = None) -> None:
        self.name = name
        self.parent = parent
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.initializers: dict[str, Value] = {}
        self.metadata: dict[str, str] = {}
        self.opset: int | None = None
        self.layouts: dict[str, str] = {}
        """Memory formats chosen by the layout pass, by value name ("channels_last"); others are row-major."""
        self._namer: _Namer = parent._namer if parent is not None else _Namer()

    # --- names ----------------------------------------------------------------------------------------

    def fresh_name(self, hint: str) -> str:
        return self._namer.fresh(hint)

    def fresh_dim(self, hint: str = "d") -> str:
        """A new symbolic dim, for sizes only known at run time (NonZero's count, a data-dependent Reshape)."""
        return self._namer.fresh(f"_{hint}")

    def use_name(self, name: str) -> None:
        """Mark a name as taken (when rebuilding a graph whose names are already unique)."""
        self._namer.used.add(name)

    def reserve(self, names: Iterable[str]) -> None:
        """Keep names for values of this (root) graph that are created later: the model's inputs and outputs
        keep their names even when a subgraph imported earlier uses the same ones."""
        self._namer.reserved.update(n for n in names if n not in self._namer.used)

    # --- building -------------------------------------------------------------------------------------

    def add_input(self, name: str, type: ValueType) -> Value:
        v = Value(self._namer.fresh(name, claim=self.parent is None), type)
        self.inputs.append(v)
        return v

    def add_initializer(self, name: str, data: Constant, dtype: DType | None = None) -> Value:
        """A constant tensor. `dtype` is needed only for narrow types stored widened (int4 in int8, ...)."""
        if isinstance(data, np.ndarray):
            t = TensorType(DType.STRING, tuple(data.shape))
        else:
            t = TensorType(dtype or DType.from_torch(data.dtype), tuple(data.shape))
        v = Value(self._namer.fresh(name, claim=self.parent is None), t, data)
        self.initializers[v.name] = v
        return v

    def add(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: dict[str, Any] | None = None,
        *,
        name: str = "",
        outputs: Sequence[str] | int | None = None,
    ) -> list[Value]:
        """Append a node of `op`: checks its attributes, infers its output types and returns its outputs."""
        from kiln.ir.ops import get_op
        from kiln.ir.ops.base import fold_small_constants, infer_node

        opdef = get_op(op)
        node = Node(op, list(inputs), [], opdef.check_attrs(attrs or {}, name or op), name or self.fresh_name(op))
        if outputs is None:
            outputs = opdef.default_output_count(node)
        names = [f"{node.name}_out{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        types = infer_node(node, self, len(names))
        for out_name, t in zip(names, types):
            v = Value(self._namer.fresh(out_name, claim=self.parent is None), t)
            v.producer = node
            node.outputs.append(v)
        self.nodes.append(node)
        fold_small_constants(node)
        return node.outputs

    # --- queries --------------------------------------------------------------------------------------

    def all_nodes(self) -> Iterator[Node]:
        """Every node, including those of nested subgraphs."""
        for n in self.nodes:
            yield n
            for g in n.subgraphs():
                yield from g.all_nodes()

    def consumers(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    out.setdefault(v, []).append(n)
        return out

    def value_map(self) -> dict[str, Value]:
        m = {v.name: v for v in self.inputs}
        m.update(self.initializers)
        for n in self.nodes:
            for v in n.outputs:
                m[v.name] = v
        return m

    # --- rewriting (used by the passes) --------------------------------------------------------------

    def replace_uses(self, old: Value, new: Value) -> int:
        """Make every reader of `old` read `new` instead: node inputs here and in nested subgraphs (which may
        read outer values), and this graph's outputs. Returns how many uses changed. A graph output keeps its
        position; callers that must keep an output's *name* should rename `new` (see `rename`)."""
        count = 0
        for n in self.all_nodes():
            for i, v in enumerate(n.inputs):
                if v is old:
                    n.inputs[i] = new
                    count += 1
        for g in _nested(self):  # this graph's outputs, and subgraphs that return an outer value as is
            for i, v in enumerate(g.outputs):
                if v is old:
                    g.outputs[i] = new
                    count += 1
        return count

    def rename(self, value: Value, name: str) -> None:
        """Give `value` the name `name`; a value of this graph that holds it now gets a fresh one."""
        if value.name == name:
            return
        holder = self.value_map().get(name)
        if holder is not None and holder is not value:
            self._rekey(holder, self.fresh_name(name))
        self._namer.used.add(name)
        self._rekey(value, name)

    def _rekey(self, v: Value, new: str) -> None:
        if self.initializers.get(v.name) is v:
            del self.initializers[v.name]
            self.initializers[new] = v
        v.name = new

    def remove_nodes(self, nodes: Iterable[Node]) -> int:
        drop = {id(n) for n in nodes}
        before = len(self.nodes)
        self.nodes = [n for n in self.nodes if id(n) not in drop]
        return before - len(self.nodes)

    def insert_node(self, node: Node, index: int | None = None) -> Node:
        """Put an already built node into the graph (at `index`, else at the end); links its outputs to it."""
        for v in node.outputs:
            v.producer = node
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return node

    def toposort(self) -> None:
        """Order nodes so producers come first, keeping the current order wherever it is already valid."""
        order = {id(n): i for i, n in enumerate(self.nodes)}
        producer = {v: n for n in self.nodes for v in n.outputs}
        deps: dict[int, set[int]] = {}
        for n in self.nodes:
            reads: set[Value] = {v for v in n.inputs if v is not None}
            for g in n.subgraphs():
                reads |= {v for m in g.all_nodes() for v in m.inputs if v is not None}
                reads |= {v for s in _nested(g) for v in s.outputs}  # a branch may return an outer value
            deps[id(n)] = {id(producer[v]) for v in reads if v in producer and producer[v] is not n}
        import heapq

        users: dict[int, list[int]] = {id(n): [] for n in self.nodes}
        for k, ds in deps.items():
            for d in ds:
                users[d].append(k)
        waiting = {k: len(ds) for k, ds in deps.items()}
        by_id = {id(n): n for n in self.nodes}
        ready = [(order[k], k) for k, c in waiting.items() if c == 0]
        heapq.heapify(ready)
        out: list[Node] = []
        while ready:
            _, k = heapq.heappop(ready)
            out.append(by_id[k])
            for u in users[k]:
                waiting[u] -= 1
                if waiting[u] == 0:
                    heapq.heappush(ready, (order[u], u))
        if len(out) != len(self.nodes):
            stuck = [by_id[k].name for k, c in waiting.items() if c > 0][:3]
            raise GraphError(f"graph '{self.name}' has a cycle through node(s) {', '.join(stuck)}")
        self.nodes = out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.all_nodes():
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def __repr__(self) -> str:
        return f"Graph({self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, {len(self.outputs)} outputs)"

    def __str__(self) -> str:
        from kiln.ir.printer import format_graph

        return format_graph(self)


def _nested(g: Graph) -> Iterator[Graph]:
    """`g` and every graph nested in it."""
    yield g
    for n in g.nodes:
        for s in n.subgraphs():
            yield from _nested(s)
