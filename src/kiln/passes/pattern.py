"""Local rewrites as pattern tables: rows of (op names, rewrite function).

A rewrite function gets the graph, a node of one of the row's ops and the current uses, and either returns None
(the pattern does not apply here) or rewrites the graph and returns the name of what it did ("folded", ...),
which the pass reports as a count. Rows are tried in order; after a change the uses are recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kiln.ir.graph import Graph, Node
from kiln.passes.manager import PassResult
from kiln.passes.rewrite import Uses

Rewrite = Callable[[Graph, Node, Uses], str | None]
Rule = tuple[frozenset[str], Rewrite]


def rule(ops: str | Sequence[str], fn: Rewrite) -> Rule:
    return (frozenset([ops] if isinstance(ops, str) else ops), fn)


def apply_rules(graph: Graph, rules: Sequence[Rule], *, max_rounds: int = 20) -> PassResult:
    """Apply the rules until nothing changes (at most `max_rounds` sweeps over the graph)."""
    counts: dict[str, int] = {}
    for _ in range(max_rounds):
        changed = False
        uses = Uses.of(graph)
        live = {id(n) for n in graph.nodes}  # the sweep's list keeps every node alive: ids are not reused
        for node in list(graph.nodes):
            if id(node) not in live:
                continue  # removed by an earlier rewrite in this sweep
            for ops, fn in rules:
                if node.op in ops:
                    what = fn(graph, node, uses)
                    if what:
                        counts[what] = counts.get(what, 0) + 1
                        changed = True
                        uses = Uses.of(graph)
                        live = {id(n) for n in graph.nodes}
                        break
        if not changed:
            break
    return PassResult(bool(counts), counts)
