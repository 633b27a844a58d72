"""The IR verifier: structural checks, run after import and after every pass."""

from __future__ import annotations

from kiln.ir.graph import Graph, TensorType, Value
from kiln.ir.ops import OPS
from kiln.ir.ops.base import infer_node
from kiln.utils.errors import GraphError


def verify(graph: Graph, *, types: bool = False) -> None:
    """Raise GraphError on the first problem. With types=True, re-infer every node and compare types."""
    _verify(graph, set(), types)


def _verify(g: Graph, outer: set[Value], types: bool) -> None:
    defined: set[Value] = set(outer)
    names: set[str] = set()

    def define(v: Value, where: str) -> None:
        if v in defined and v not in outer:
            raise GraphError(f"graph '{g.name}': value '{v.name}' is defined twice ({where})")
        if v.name in names:
            raise GraphError(f"graph '{g.name}': two values are named '{v.name}' ({where})")
        names.add(v.name)
        defined.add(v)

    for v in g.inputs:
        define(v, "graph input")
    for name, v in g.initializers.items():
        if v.data is None:
            raise GraphError(f"graph '{g.name}': initializer '{name}' has no data")
        if name != v.name:
            raise GraphError(f"graph '{g.name}': initializer key '{name}' != value name '{v.name}'")
        define(v, "initializer")
    for n in g.nodes:
        if n.op not in OPS:
            raise GraphError(f"node '{n.name}': unknown op '{n.op}'")
        opdef = OPS[n.op]
        for i, inp in enumerate(n.inputs):
            if inp is not None and inp not in defined:
                raise GraphError(
                    f"node '{n.name}' ({n.op}) reads '{inp.name}' (input {i}) before it is defined, or from "
                    f"outside its graph"
                )
        opdef.check_attrs(n.attrs, n.name)
        for sub in n.subgraphs():
            _verify(sub, defined, types)
        if types:
            inferred = infer_node(n, g, len(n.outputs))
            for v, t in zip(n.outputs, inferred):
                if isinstance(t, TensorType) and isinstance(v.type, TensorType) and t.dtype != v.type.dtype:
                    raise GraphError(
                        f"node '{n.name}' ({n.op}): output '{v.name}' is typed {v.type}, inference says {t}"
                    )
        for v in n.outputs:
            if v.producer is not n:
                raise GraphError(f"node '{n.name}': output '{v.name}' does not point back to its producer")
            define(v, f"output of node '{n.name}'")
    for v in g.outputs:
        if v not in defined:
            raise GraphError(f"graph '{g.name}': output '{v.name}' is never computed")
