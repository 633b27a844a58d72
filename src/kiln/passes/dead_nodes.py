"""Dead-node elimination: nodes none of whose outputs is read (by a kept node, a subgraph of one, or a graph
output) are removed, and so are initializers nothing reads. One backward sweep reaches the fixed point.

Rewrite cases: an unused Shape/Constant chain; a node whose only readers were removed by an earlier pass;
weights orphaned by folding; the same inside the bodies of If/Loop/Scan nodes (a body's outputs are its
roots), bodies first, so that outer values only dead body nodes read die too.
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Value
from kiln.passes.manager import PassResult
from kiln.passes.rewrite import reads


def dead_nodes(graph: Graph) -> PassResult:
    removed, weights = _sweep(graph)
    return PassResult.of(nodes_removed=removed, weights_removed=weights)


def _sweep(graph: Graph) -> tuple[int, int]:
    """Dead nodes and weights of `graph` and, inside each kept node, of its bodies (their outputs are what
    they must compute; a body cleaned first reads fewer outer values). Fused bodies are left as they are."""
    live: set[Value] = set(graph.outputs)
    keep = []
    removed = weights = 0
    for n in reversed(graph.nodes):
        if any(v in live for v in n.outputs):
            if n.op != "Fused":
                for sub in n.subgraphs():
                    r, w = _sweep(sub)
                    removed, weights = removed + r, weights + w
            keep.append(n)
            live.update(reads(n))
    removed += len(graph.nodes) - len(keep)
    graph.nodes = keep[::-1]
    dead = [name for name, v in graph.initializers.items() if v not in live]
    for name in dead:
        del graph.initializers[name]
    return removed, weights + len(dead)
