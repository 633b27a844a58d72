"""THE ordered list of graph passes. Each entry is (name, pass); a comment on every ordering constraint.

The optimizer's passes (constant folding, dead-node elimination, fusion, ...) land here with the optimizer
issue; until then the pipeline is empty and engines run the imported graph as is.
"""

from __future__ import annotations

from kiln.ir.graph import Graph
from kiln.passes.manager import Pass, PassRecord, run_passes

PIPELINE: list[tuple[str, Pass]] = []


def optimize(graph: Graph) -> list[PassRecord]:
    """Run the pipeline on `graph` in place; returns what each pass did."""
    return run_passes(graph, PIPELINE)
