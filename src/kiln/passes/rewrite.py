"""Tools every pass uses: who reads a value, replacing values, and turning a set of nodes into one Fused node."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops.base import const_value


@dataclass
class Uses:
    """Readers of every value of a graph (nodes here, nodes of nested subgraphs, and the graph's outputs)."""

    readers: dict[Value, list[Node]]
    outputs: set[Value]

    @staticmethod
    def of(graph: Graph) -> Uses:
        readers: dict[Value, list[Node]] = {}
        for n in graph.nodes:
            for v in reads(n):
                readers.setdefault(v, []).append(n)
        return Uses(readers, set(graph.outputs))

    def count(self, v: Value) -> int:
        return len(self.readers.get(v, ())) + (v in self.outputs)

    def only_reader(self, v: Value) -> Node | None:
        """The single node reading `v`, when `v` has exactly one use and is not a graph output."""
        r = self.readers.get(v, [])
        return r[0] if len(r) == 1 and v not in self.outputs else None


def reads(n: Node) -> list[Value]:
    """Values a node reads: its inputs and what its subgraphs read (outer values included)."""
    out = [v for v in n.inputs if v is not None]
    for g in n.subgraphs():
        for m in g.all_nodes():
            out.extend(v for v in m.inputs if v is not None)
    return out


def redirect(graph: Graph, old: Value, new: Value, *, skip: Iterable[Node] = ()) -> None:
    """Readers of `old` (except nodes in `skip` and the insides of Fused bodies) read `new`; a graph output
    `old` becomes `new`, which takes `old`'s name so the model's outputs keep their names."""
    was_output = old in graph.outputs
    _replace(graph, old, new, skip)
    if was_output:
        name = old.name
        graph.rename(old, graph.fresh_name(f"{name}.replaced"))
        graph.rename(new, name)


def _replace(graph: Graph, old: Value, new: Value, skip: Iterable[Node] = ()) -> None:
    skipped = {id(n) for n in skip}
    for n in graph.nodes:
        if id(n) in skipped:
            continue
        n.inputs = [new if v is old else v for v in n.inputs]
        if n.op != "Fused":  # fused bodies read only their own inputs
            for g in n.subgraphs():
                for m in g.all_nodes():
                    m.inputs = [new if v is old else v for v in m.inputs]
    graph.outputs = [new if v is old else v for v in graph.outputs]


def is_const(v: Value | None) -> bool:
    return v is not None and const_value(v) is not None


def fuse(graph: Graph, nodes: Sequence[Node], kind: str, name: str | None = None) -> Node:
    """Replace `nodes` (a connected region, producers before readers) by one Fused node whose body holds them.

    The body reads every value the region uses from outside as an input (weights included, so they stay graph
    initializers); every region value used outside (or a graph output) becomes an output of the fused node and
    keeps its name there, so per-layer comparison and the model's output names still work.
    """
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    region = sorted(nodes, key=lambda n: index[id(n)])
    ids = {id(n) for n in region}
    produced = {v for n in region for v in n.outputs}
    uses = Uses.of(graph)
    ext_in: list[Value] = []
    for n in region:
        for v in reads(n):
            if v not in produced and v not in ext_in:
                ext_in.append(v)
    ext_out = [v for n in region for v in n.outputs
               if v in uses.outputs or any(id(r) not in ids for r in uses.readers.get(v, ()))]
    body = Graph(name or " + ".join(n.name for n in region), parent=graph)
    inner = {v: Value(graph.fresh_name(f"{v.name}.in"), v.type) for v in ext_in}
    body.inputs = [inner[v] for v in ext_in]
    for n in region:
        n.inputs = [inner.get(v, v) if v is not None else None for v in n.inputs]
        body.nodes.append(n)
    body.outputs = list(ext_out)
    outer = [Value(v.name, v.type) for v in ext_out]
    for v, o in zip(ext_out, outer):
        v.name = graph.fresh_name(f"{o.name}.inner")
    node = Node("Fused", list(ext_in), outer, {"body": body, "kind": kind}, body.name)
    position = index[id(region[-1])] - len(region) + 1
    graph.remove_nodes(region)
    graph.insert_node(node, position)
    for v, o in zip(ext_out, outer):
        _replace(graph, v, o, skip=[node])
    graph.use_name(node.name)
    return node
