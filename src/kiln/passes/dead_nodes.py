"""Dead-node elimination: nodes none of whose outputs is read (by a kept node, a subgraph of one, or a graph
output) are removed, and so are initializers nothing reads. One backward sweep reaches the fixed point.

Rewrite cases: an unused Shape/Constant chain; a node whose only readers were removed by an earlier pass;
weights orphaned by folding.
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Value
from kiln.passes.manager import PassResult
from kiln.passes.rewrite import reads


def dead_nodes(graph: Graph) -> PassResult:
    live: set[Value] = set(graph.outputs)
    keep = []
    for n in reversed(graph.nodes):
        if any(v in live for v in n.outputs):
            keep.append(n)
            live.update(reads(n))
    removed = len(graph.nodes) - len(keep)
    graph.nodes = keep[::-1]
    dead = [name for name, v in graph.initializers.items() if v not in live]
    for name in dead:
        del graph.initializers[name]
    return PassResult.of(nodes_removed=removed, weights_removed=len(dead))
