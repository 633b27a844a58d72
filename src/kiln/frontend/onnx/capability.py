"""`kiln check`: every unsupported or suspicious node of a model, found in one pass."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import onnx

from kiln.frontend.onnx.importer import Importer, Problem, load_model
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, TensorType
from kiln.utils.errors import KilnError

# Ops whose output shape depends on input *values*: they run, but stop whole-graph CUDA-graph capture later.
DATA_DEPENDENT = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress", "TopK_dynamic"})
RANDOM = frozenset({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial",
                    "Bernoulli"})


@dataclass
class Report:
    path: str
    n_nodes: int
    ops: Counter[str]
    problems: list[Problem] = field(default_factory=list)
    graph: Graph | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def supported(self) -> bool:
        return not self.errors


def _count_nodes(g: onnx.GraphProto, ops: Counter[str]) -> int:
    n = 0
    for node in g.node:
        n += 1
        ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
        for a in node.attribute:
            for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                n += _count_nodes(sg, ops)
    return n


def check_model(src: str | os.PathLike[str] | bytes | onnx.ModelProto) -> Report:
    """Import in collect mode and add warnings about supported-but-notable things. Raises only when the file
    cannot be read at all (ModelLoadError)."""
    model, base_dir = load_model(src)
    ops: Counter[str] = Counter()
    n = _count_nodes(model.graph, ops)
    report = Report(str(src) if not isinstance(src, (bytes, onnx.ModelProto)) else "<model>", n, ops)
    imp = Importer(model, base_dir, collect=True)
    try:
        graph = imp.run()
    except KilnError as e:  # a structural failure the importer cannot step over
        imp.problems.append(Problem("error", e.message))
        graph = None
    report.problems = imp.problems
    if graph is not None and not report.errors:
        report.graph = graph
        report.problems.extend(_warnings(graph))
    return report


def _warnings(g: Graph) -> list[Problem]:
    out: list[Problem] = []
    opset = g.opset
    for n in g.all_nodes():
        if n.op in DATA_DEPENDENT:
            out.append(Problem("warning", "output shape depends on input values (no CUDA graph capture across it)",
                               n.op, n.name, opset))
        if n.op in RANDOM:
            out.append(Problem("warning", "random op: outputs differ from run to run", n.op, n.name, opset))
        if n.attrs.get("training_mode") == 1:
            out.append(Problem("warning", "training_mode=1: training behaviour at inference", n.op, n.name, opset))
        for v in n.outputs:
            if isinstance(v.type, TensorType) and v.type.dtype is DType.FLOAT64 and n.op not in ("Constant",):
                out.append(Problem("warning", f"computes in float64 ('{v.name}'): slow on GPUs", n.op, n.name,
                                   opset))
                break
    return out


def format_report(r: Report, *, show_ops: bool = False) -> str:
    lines = [f"{r.path}: {r.n_nodes} nodes, {len(r.ops)} op types"]
    if show_ops:
        lines.append("  ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(r.ops.items())))
    if r.problems:
        lines.append(f"  {'severity':7s} {'op (opset)':32s} {'node':28s} reason")
        for p in r.problems:
            lines.append(f"  {p}")
    unsupported_ops = sorted({p.op for p in r.errors if p.op})
    if r.supported:
        lines.append(f"SUPPORTED: every node imports ({len(r.warnings)} warning{'s' * (len(r.warnings) != 1)})")
    else:
        lines.append(f"NOT SUPPORTED: {len(r.errors)} problem{'s' * (len(r.errors) != 1)}"
                     + (f" (ops: {', '.join(unsupported_ops)})" if unsupported_ops else "")
                     + f", {len(r.warnings)} warning{'s' * (len(r.warnings) != 1)}")
    return "\n".join(lines)
