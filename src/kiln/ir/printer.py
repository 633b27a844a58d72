"""A readable text form of a graph, for logs, `kiln inspect` and debugging."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.ir.graph import Graph, Node, Value


def _fmt_attr(v: Any) -> str:
    if isinstance(v, Graph):
        return f"<graph {v.name}>"
    if isinstance(v, torch.Tensor):
        if v.numel() <= 8:
            return f"tensor({v.tolist()})"
        return f"tensor<{str(v.dtype).replace('torch.', '')}{list(v.shape)}>"
    if isinstance(v, np.ndarray):
        return f"strings{list(v.shape)}"
    if isinstance(v, tuple):
        return "[" + ", ".join(_fmt_attr(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _ref(v: Value | None) -> str:
    return "_" if v is None else f"%{v.name}"


def format_node(n: Node, indent: str = "") -> list[str]:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in n.outputs)
    attrs = {k: v for k, v in n.attrs.items() if v is not None}
    attr_s = (" {" + ", ".join(f"{k}={_fmt_attr(v)}" for k, v in attrs.items()) + "}") if attrs else ""
    lines = [f"{indent}{outs} = {n.op}({', '.join(_ref(v) for v in n.inputs)}){attr_s}  # {n.name}"]
    for key, val in n.attrs.items():
        graphs = [val] if isinstance(val, Graph) else [g for g in val if isinstance(g, Graph)] \
            if isinstance(val, tuple) else []
        for g in graphs:
            lines.append(f"{indent}  {key}:")
            lines.extend(format_graph(g, indent + "    ").splitlines())
    return lines


def format_graph(g: Graph, indent: str = "", max_initializers: int = 20) -> str:
    lines = [f"{indent}graph {g.name}" + (f" (opset {g.opset})" if g.opset else "")]
    lines.append(f"{indent}  inputs: " + ", ".join(f"%{v.name}: {v.type}" for v in g.inputs))
    if g.initializers:
        nbytes = sum(getattr(v.data, "nbytes", 0) for v in g.initializers.values())
        lines.append(f"{indent}  initializers: {len(g.initializers)} ({nbytes / 1e6:.2f} MB)")
        for v in list(g.initializers.values())[:max_initializers]:
            lines.append(f"{indent}    %{v.name}: {v.type}")
        if len(g.initializers) > max_initializers:
            lines.append(f"{indent}    ... {len(g.initializers) - max_initializers} more")
    for n in g.nodes:
        lines.extend(format_node(n, indent + "  "))
    lines.append(f"{indent}  outputs: " + ", ".join(_ref(v) for v in g.outputs))
    return "\n".join(lines)
