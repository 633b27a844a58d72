"""THE ordered list of graph passes. Each entry is (name, pass factory); a comment on every ordering constraint.

The optimizer's passes land here one by one (see the optimizer issue); each is a file in this package with its
own tests on hand-built graphs.
"""

from __future__ import annotations

from kiln.ir.graph import Graph
from kiln.passes.manager import PassContext, PassFactory, PassRecord, run_passes

PIPELINE: list[tuple[str, PassFactory]] = []


def optimize(graph: Graph, context: PassContext | None = None) -> list[PassRecord]:
    """Run the pipeline on `graph` in place; returns what each pass did."""
    ctx = context or PassContext()
    return run_passes(graph, [(name, factory(ctx)) for name, factory in PIPELINE])
