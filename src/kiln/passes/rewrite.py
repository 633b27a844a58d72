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
    """Values a node reads: its inputs and what its subgraphs read (outer values included; a branch may also
    return an outer value as its output, without a node reading it)."""
    out = [v for v in n.inputs if v is not None]
    for g in n.subgraphs():
        out.extend(g.outputs)
        for m in g.all_nodes():
            out.extend(v for v in m.inputs if v is not None)
            for s in m.subgraphs():
                out.extend(s.outputs)
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
                _replace_inside(g, old, new)
    graph.outputs = [new if v is old else v for v in graph.outputs]


def _replace_inside(g: Graph, old: Value, new: Value) -> None:
    """In a subgraph (and those nested in it): node inputs and the graph's own outputs."""
    g.outputs = [new if v is old else v for v in g.outputs]
    for m in g.nodes:
        m.inputs = [new if v is old else v for v in m.inputs]
        for s in m.subgraphs():
            _replace_inside(s, old, new)


def is_const(v: Value | None) -> bool:
    return v is not None and const_value(v) is not None


class BodyInputs:
    """The inputs of a fused body built by hand: `take(v)` is the body's input standing for the outer value v (made
    on first use, named after it); `outer` lists the outer values in the order their inputs were made."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.inner: dict[Value, Value] = {}

    def take(self, v: Value | None) -> Value | None:
        if v is None:
            return None
        if v not in self.inner:
            self.inner[v] = Value(self.graph.fresh_name(f"{v.name}.in"), v.type)
        return self.inner[v]

    @property
    def outer(self) -> list[Value | None]:
        return list(self.inner)

    @property
    def inputs(self) -> list[Value]:
        return list(self.inner.values())


def fuse(graph: Graph, nodes: Sequence[Node], kind: str, name: str | None = None, *,
         uses: Uses | None = None) -> Node:
    """Replace `nodes` (a connected region, producers before readers) by one Fused node whose body holds them.

    The body reads every value the region uses from outside as an input (weights included, so they stay graph
    initializers); every region value used outside (or a graph output) becomes an output of the fused node and
    keeps its name there, so per-layer comparison and the model's output names still work.

    A pass that fuses many regions passes the graph's current `uses`: then they are not recomputed (which
    would make n fusions cost O(n^2)), only the region's readers are rewritten, and `uses` is updated in place.
    """
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    region = sorted(nodes, key=lambda n: index[id(n)])
    ids = {id(n) for n in region}
    produced = {v for n in region for v in n.outputs}
    kept = uses
    uses = Uses.of(graph) if kept is None else kept
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
        if kept is None:
            _replace(graph, v, o, skip=[node])
        else:
            _replace_readers(graph, v, o, [r for r in kept.readers.get(v, ()) if id(r) not in ids])
    if kept is not None:
        _update_uses(kept, ids, node, produced, ext_out)
    graph.use_name(node.name)
    return node


def _replace_readers(graph: Graph, old: Value, new: Value, readers: Sequence[Node]) -> None:
    """`_replace` limited to the given readers (and the graph's outputs)."""
    for n in {id(r): r for r in readers}.values():
        n.inputs = [new if v is old else v for v in n.inputs]
        if n.op != "Fused":
            for g in n.subgraphs():
                _replace_inside(g, old, new)
    graph.outputs = [new if v is old else v for v in graph.outputs]


def _update_uses(uses: Uses, ids: set[int], node: Node, produced: set[Value], ext_out: Sequence[Value]) -> None:
    """Uses after `fuse`: the region's readings are the fused node's, its outputs are read by the same readers."""
    for v in node.inputs:
        if v is not None:
            uses.readers[v] = [r for r in uses.readers.get(v, ()) if id(r) not in ids] + [node]
    for v, o in zip(ext_out, node.outputs):
        uses.readers[o] = [r for r in uses.readers.get(v, ()) if id(r) not in ids]
        if v in uses.outputs:
            uses.outputs.discard(v)
            uses.outputs.add(o)
    for v in produced:
        uses.readers.pop(v, None)


def graphs(graph: Graph) -> list[Graph]:
    """`graph` and every graph nested in it (If/Loop/Scan bodies, outermost first); Fused bodies are left out:
    they are code-generation templates, not graphs to rewrite."""
    out = [graph]
    for n in graph.nodes:
        if n.op != "Fused":
            for g in n.subgraphs():
                out.extend(graphs(g))
    return out


def can_redirect(graph: Graph, old: Value, new: Value) -> bool:
    """Whether `try_redirect(graph, old, new)` keeps the graph's interface. When `old` is an output of the
    model's graph, `new` takes its name, so `new` must be a value that graph defines (a node output or an
    initializer of its own; not a graph input or another output). A body's outputs bind by position, so
    there `new` may be anything but another output (an outer value, a body input)."""
    if old not in graph.outputs:
        return True
    if new in graph.outputs:
        return False
    if graph.parent is not None or graph.initializers.get(new.name) is new:
        return True
    return new.producer is not None and any(n is new.producer for n in graph.nodes)


def try_redirect(graph: Graph, old: Value, new: Value) -> bool:
    """`redirect(graph, old, new)` when `can_redirect` allows it. An output of the model keeps its declared
    type (the value is the same, and the model's interface does not change); in a body nothing is renamed.
    Returns whether it redirected."""
    if not can_redirect(graph, old, new):
        return False
    if graph.parent is not None:  # a body: no renaming (`new` may be an outer value)
        _replace(graph, old, new)
        return True
    was_output = old in graph.outputs
    redirect(graph, old, new)
    if was_output:
        new.type = old.type  # the model's interface, as declared (inference never reads a type back worse)
    return True
