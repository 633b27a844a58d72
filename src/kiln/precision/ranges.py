"""Which layers must stay FP32 in an FP16 build: the ones whose values (seen on sample inputs) leave FP16's
range, and the ones the user pins.

A layer is a node of the optimized graph (a Fused node is one layer: its body's intermediate values count too).
A layer is kept in FP32 when any float value it reads or writes exceeds `headroom * 65504` in magnitude on the
sample runs, or is inf/NaN while the FP32 run is finite there; keeping both the producer and every reader of an
out-of-range value means no cast to FP16 ever meets it. BF16 has FP32's range: only pins apply.

One exception: an additive attention mask whose only large values are negative (transformers' `finfo.min` for
padded keys) hides those keys whatever their size. In FP16 its constant becomes -65504 (the lowering clamps
constants), the keys stay hidden, and neither the mask's producer nor the attention is kept in FP32 for it (a
BERT FP16 build on padded calibration sentences otherwise ran every attention in FP32).
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
    masks: list[str] = field(default_factory=list)
    """Values beyond FP16's range that only hide attention keys, lowered anyway (`hiding_masks`)."""


def observe_peaks(graph: Graph, feeds: Iterable[Mapping[str, Any]], device: torch.device,
                  highs: dict[Value, float] | None = None) -> dict[Value, float]:
    """The largest magnitude of every float value (Fused bodies' intermediates included) over runs on `feeds`
    (inf when a value was not finite). `highs`, when given, receives each value's largest (signed) element."""
    peaks: dict[Value, float] = {}

    def note(v: Value, x: Any) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            y = x.detach()
            y = y.float() if y.element_size() == 1 else y  # why: CUDA has no abs or max for float8
            a = y.abs().max()
            m = float(a) if bool(torch.isfinite(a)) else float("inf")
            peaks[v] = max(peaks.get(v, 0.0), m)
            if highs is not None:
                h = float(y.max())
                highs[v] = max(highs.get(v, -float("inf")), h if h == h else float("inf"))

    def observe(node: Node, args: list[Any], results: list[Any]) -> None:
        for v, x in zip(node.outputs, results):
            note(v, x)
        if node.op == "Fused":
            _body_peaks(node, args, note)

    interp = Interpreter(graph, check=False, device=device, observer=observe)
    for f in feeds:
        interp.run(dict(f))
    return peaks


def hiding_masks(graph: Graph, peaks: Mapping[Value, float], highs: Mapping[Value, float], limit: float) -> \
        set[Value]:
    """Values beyond `limit` that only ever hide keys: read by nothing but Attention nodes, as their mask input,
    and with no element above `limit` (every large element negative)."""
    readers: dict[Value, list[tuple[Node, int]]] = {}
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            if v is not None:
                readers.setdefault(v, []).append((n, i))
    outputs = set(graph.outputs)
    return {v for v, p in peaks.items() if p > limit and highs.get(v, float("inf")) <= limit and v not in outputs
            and readers.get(v) and all(n.op == "Attention" and i == 3 for n, i in readers[v])}


def _body_peaks(node: Node, args: list[Any], note: Any) -> None:
    body: Graph = node.attrs["body"]
    device = next((x.device for x in args if isinstance(x, torch.Tensor)), None)
    run_nodes(body.nodes, dict(zip(body.inputs, args)), device, note)


def decide(graph: Graph, to: DType, peaks: Mapping[Value, float], pins: Mapping[str, str],
           highs: Mapping[Value, float] | None = None) -> Decision:
    """The layers kept in FP32, with reasons. `pins`: layer-name glob -> "fp32" (every pattern must match).
    `highs` (each value's largest element, from `observe_peaks`) lets hiding attention masks pass (module doc)."""
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
    masks = hiding_masks(graph, peaks, highs, limit) if highs is not None else set()
    d.masks = sorted(v.name for v in masks)
    for n in graph.nodes:
        if n.name in d.kept:
            continue
        vals = [v for v in (*n.inputs, *n.outputs) if v is not None and v.data is None and v not in masks]
        if n.op == "Fused":
            body: Graph = n.attrs["body"]
            hidden = {b for b, o in zip(body.outputs, n.outputs) if o in masks}
            vals += [v for m in body.nodes for v in m.outputs if v not in hidden]
        worst = max((peaks.get(v, 0.0) for v in vals), default=0.0)
        if worst > limit:
            shown = "inf/NaN" if worst == float("inf") else f"{worst:.4g}"
            d.kept[n.name] = f"values reach {shown}, beyond FP16's range (65504)"
    return d
