"""Runs graph passes in order: after each, nodes are re-sorted topologically and the IR is verified; what each
pass did is recorded; with KILN_DUMP_GRAPHS=DIR the graph is written after every pass, numbered."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kiln.ir.graph import Graph, Node
from kiln.ir.printer import format_graph
from kiln.ir.verify import verify
from kiln.utils.env import env


@dataclass
class PassResult:
    changed: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    """What the pass did, e.g. {"folded": 53}."""

    def summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.counts.items() if v) or "no change"

    @staticmethod
    def of(**counts: int) -> PassResult:
        return PassResult(any(counts.values()), {k: v for k, v in counts.items()})


@dataclass(frozen=True)
class PassContext:
    """What some passes need besides the graph: dims that are static in every profile (symbol -> size), the kind
    of device the engine is built for ("cpu" or "cuda"), its compute capability and the optimization level."""

    static_dims: Mapping[str, int] = field(default_factory=dict)
    device: str = "cpu"
    opt_level: int = 3
    """The build's optimization level (`BuilderConfig.opt_level`): opt-in rewrites wait for 4."""
    capability: tuple[int, int] | None = None
    """The build GPU's compute capability ((9, 0) for an H100), None off GPUs: rewrites whose only fast kernel
    needs a feature of some GPUs (Hopper's TMA) ask."""
    runnable: Callable[[Node], bool] | None = None
    """Whether a kernel other than the reference takes a node on the build device - supplied by the builder, which
    may ask the kernel registry (passes may not): a rewrite that makes a node only one kernel takes checks it."""


Pass = Callable[[Graph], PassResult]
PassFactory = Callable[[PassContext], Pass]


@dataclass
class PassRecord:
    name: str
    result: PassResult
    seconds: float
    nodes_after: int


def run_passes(graph: Graph, passes: Sequence[tuple[str, Pass]], stage: str = "") -> list[PassRecord]:
    """`stage` names a later pass list (its dumps are `STAGE_NN_name.txt`, after the first list's `NN_name.txt`)."""
    dump = env().dump_graphs
    prefix = f"{stage}_" if stage else ""
    if dump:
        os.makedirs(dump, exist_ok=True)
        _write(dump, 0, "start" if stage else "imported", graph, prefix)
    records = []
    for i, (name, fn) in enumerate(passes, start=1):
        t0 = time.perf_counter()
        result = fn(graph)
        if result.changed:
            graph.toposort()
            verify(graph)
        records.append(PassRecord(name, result, time.perf_counter() - t0, len(graph.nodes)))
        if dump:
            _write(dump, i, name, graph, prefix)
    return records


def _write(folder: str, i: int, name: str, graph: Graph, prefix: str = "") -> None:
    with open(os.path.join(folder, f"{prefix}{i:02d}_{name}.txt"), "w") as f:
        f.write(format_graph(graph, max_initializers=1000) + "\n")
