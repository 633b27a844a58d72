"""Which layers must stay FP32 in an FP16 build: the ones whose values (seen on sample inputs) leave FP16's
range, and the ones the user pins.

A layer is a node of the optimized graph (a Fused node is one layer: its body's intermediate values count too).
A layer is kept in FP32 when any float value it reads or writes exceeds `headroom * 65504` in magnitude on the
sample runs, or is inf/NaN while the FP32 run is finite there; keeping both the producer and every reader of an
out-of-range value means no cast to FP16 ever meets it. BF16 has FP32's range: only pins apply.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.interpreter import Interpreter
from kiln.ir.ops.base import run_nodes
from kiln.utils.errors import KilnError

FP16_MAX = 65504.0
HEADROOM = 0.5
"""Sample inputs are not the deployment data: a layer reaching half of FP16's range is kept in FP32 too."""


class PrecisionError(KilnError):
    """A layer-precision request that does not fit the model."""


@dataclass
class Decision:
    kept: dict[str, str] = field(default_factory=dict)
    """Layer name -> why it stays FP32."""
    peaks: dict[str, float] = field(default_factory=dict)
    """Value name -> the largest finite magnitude seen (for the report)."""


def observe_peaks(graph: Graph, feeds: Iterable[Mapping[str, Any]], device: torch.device) -> dict[Value, float]:
    """The largest magnitude of every float value (Fused bodies' intermediates included) over runs on `feeds`
    (inf when a value was not finite)."""
    peaks: dict[Value, float] = {}

    def note(v: Value, x: Any) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            y = x.detach()
            a = (y.float() if y.element_size() == 1 else y).abs().max()  # why: CUDA has no abs for float8
            m = float(a) if bool(torch.isfinite(a)) else float("inf")
            peaks[v] = max(peaks.get(v, 0.0), m)

    def observe(node: Node, args: list[Any], results: list[Any]) -> None:
        for v, x in zip(node.outputs, results):
            note(v, x)
        if node.op == "Fused":
            _body_peaks(node, args, note)

    interp = Interpreter(graph, check=False, device=device, observer=observe)
    for f in feeds:
        interp.run(dict(f))
    return peaks


def _body_peaks(node: Node, args: list[Any], note: Any) -> None:
    body: Graph = node.attrs["body"]
    device = next((x.device for x in args if isinstance(x, torch.Tensor)), None)
    run_nodes(body.nodes, dict(zip(body.inputs, args)), device, note)


def decide(graph: Graph, to: DType, peaks: Mapping[Value, float], pins: Mapping[str, str]) -> Decision:
    """The layers kept in FP32, with reasons. `pins`: layer-name glob -> "fp32" (every pattern must match)."""
    d = Decision(peaks={v.name: p for v, p in peaks.items()})
    for pattern, precision in pins.items():
        if precision != "fp32":
            raise PrecisionError(f"--layer-precision {pattern}:{precision}: only fp32 pins are supported",
                                 hint="pin the layers that must stay FP32; the rest follow --fp16/--bf16")
        hit = [n.name for n in graph.nodes if fnmatch.fnmatchcase(n.name, pattern)]
        if not hit:
            raise PrecisionError(f"--layer-precision {pattern}:fp32 matches no layer",
                                 hint="`kiln inspect ENGINE` lists the layer names (fused layers join theirs "
                                      "with ' + ')")
        for name in hit:
            d.kept.setdefault(name, f"pinned by '{pattern}'")
    if to is not DType.FLOAT16:
        return d
    limit = HEADROOM * FP16_MAX
    for n in graph.nodes:
        if n.name in d.kept:
            continue
        vals = [v for v in (*n.inputs, *n.outputs) if v is not None and v.data is None]
        if n.op == "Fused":
            vals += [v for m in n.attrs["body"].nodes for v in m.outputs]
        worst = max((peaks.get(v, 0.0) for v in vals), default=0.0)
        if worst > limit:
            shown = "inf/NaN" if worst == float("inf") else f"{worst:.4g}"
            d.kept[n.name] = f"values reach {shown}, beyond FP16's range (65504)"
    return d
