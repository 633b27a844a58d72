"""Whole-graph low precision: every FP32 tensor of the optimized graph becomes FP16 or BF16.

What changes: FP32 weights (clamped into the type's finite range, so -3.4e38 mask constants become -65504 in
FP16 rather than -inf, and a `0 * min` stays 0), FP32 dtype attributes (Cast to float, ConstantOfShape/Constant
values, random ops), the types of every value (re-inferred node by node, Fused bodies and subgraphs first).
The engine's interface keeps its types: FP32 graph inputs are cast on the way in, FP32 outputs on the way out.
Kept in FP32: inputs that are sizes rather than data (Resize's roi and scales), where a rounded scale would
change the output shape, and attributes naming an internal precision (LayerNorm's stash_type, attention's
softmax_precision).

Accumulation and the internals of reductions stay FP32 inside the kernels (cuBLAS/cuDNN accumulate in FP32;
the norm, softmax and pooling kernels compute their statistics in FP32). Per-layer fallback to FP32 (layers
that overflow or lose accuracy) is the mixed-precision work of the precision passes, not done here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.ops import OPS
from kiln.ir.ops.base import AttrKind, infer_node
from kiln.ir.verify import verify

LOW = (DType.FLOAT16, DType.BFLOAT16)
ACCUMULATION_ATTRS = frozenset({"stash_type", "softmax_precision", "precision"})
"""Dtype attributes that name an internal precision (a norm's statistics, attention's softmax), not a value's
type: they stay FP32."""
KEEP_FP32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}


@dataclass
class LoweringReport:
    precision: str
    weights: int = 0
    clamped: dict[str, int] = field(default_factory=dict)
    """Weights with finite values beyond the type's range, clamped to its largest (name -> how many elements)."""

    kept: dict[str, str] = field(default_factory=dict)
    """Layers left in FP32, with the reason (overflow, a user pin)."""

    def to_json(self) -> dict[str, object]:
        return {"precision": self.precision, "weights": self.weights, "clamped": dict(self.clamped),
                "kept_fp32": dict(self.kept)}


def lower_precision(graph: Graph, to: DType, fp32_layers: Mapping[str, str] | None = None) -> LoweringReport:
    """Convert `graph` (in place) to compute in `to` (FLOAT16 or BFLOAT16), except the layers (node names) in
    `fp32_layers` (name -> reason), which keep computing in FP32 behind casts; returns what was converted."""
    if to not in LOW:
        raise ValueError(f"lower_precision takes float16 or bfloat16, got {to}")
    report = LoweringReport(to.value)
    kept = [n for n in graph.nodes if fp32_layers and n.name in fp32_layers]
    report.kept = {n.name: fp32_layers[n.name] for n in kept} if fp32_layers else {}
    exempt: set[int] = set()
    keep = _kept_fp32(graph) | _shield(graph, kept, exempt)
    _convert(graph, to, report, keep, root=True, exempt=exempt)
    _cast_inputs(graph, to, exempt)
    _retype(graph, to)
    _cast_outputs(graph, to)
    verify(graph, types=True)
    return report


def _shield(graph: Graph, kept: list[Node], exempt: set[int]) -> set[Value]:
    """Guard each kept layer with casts: its float inputs cast up to FP32 (exempt casts), its float outputs cast
    down for the readers that are not kept (ordinary casts to FP32 now, which the conversion retargets). Returns
    the weights that must stay FP32 (a weight shared with a converted layer is copied for the kept one)."""
    ids = {id(n) for n in kept}
    stay: set[Value] = set()
    for k in kept:
        exempt.add(id(k))
        for i, v in enumerate(k.inputs):
            if v is None or not _is_f32(v) or (v.producer is not None and id(v.producer) in ids):
                continue
            if isinstance(v.data, torch.Tensor):
                if any(v in n.inputs for n in graph.nodes if id(n) not in ids):
                    v = graph.add_initializer(graph.fresh_name(f"{v.name}.fp32"), v.data)
                    k.inputs[i] = v
                stay.add(v)
                continue
            (up,) = graph.add("Cast", [v], {"to": DType.FLOAT32}, name=graph.fresh_name(f"{k.name}/to_fp32"))
            exempt.add(id(up.producer))
            k.inputs[i] = up
        for o in k.outputs:
            readers = [n for n in graph.nodes if o in n.inputs and id(n) not in ids and id(n) not in exempt]
            if not _is_f32(o) or not readers:
                continue
            (down,) = graph.add("Cast", [o], {"to": DType.FLOAT32}, name=graph.fresh_name(f"{k.name}/from_fp32"))
            for n in readers:
                n.inputs = [down if v is o else v for v in n.inputs]
    graph.toposort()
    return stay


def _kept_fp32(graph: Graph) -> set[Value]:
    keep: set[Value] = set()
    for n in graph.all_nodes():
        for i in KEEP_FP32_INPUTS.get(n.op, ()):
            v = n.inputs[i] if i < len(n.inputs) else None
            if v is not None:
                keep.add(v)
    return keep


def _tensor(t: torch.Tensor, to: DType, name: str, report: LoweringReport) -> torch.Tensor:
    top = torch.finfo(to.torch).max  # float32's max rounds to inf in bf16 too
    big = int((t.isfinite() & (t.abs() > top)).sum())
    if big:
        report.clamped[name] = big
        t = torch.where(t.isfinite(), t.clamp(-top, top), t)
    return t.to(to.torch)


def _is_f32(v: Value) -> bool:
    return isinstance(v.type, TensorType) and v.type.dtype is DType.FLOAT32


def _convert(g: Graph, to: DType, report: LoweringReport, keep: set[Value], root: bool,
             exempt: set[int] | None = None) -> None:
    for v in g.initializers.values():
        if _is_f32(v) and v not in keep and isinstance(v.data, torch.Tensor):
            v.data = _tensor(v.data, to, v.name, report)
            v.type = TensorType(to, v.type.shape)  # type: ignore[union-attr]
            report.weights += 1
    if not root:  # a body's inputs are the enclosing node's (now converted) values
        for v in g.inputs:
            if _is_f32(v):
                v.type = TensorType(to, v.type.shape)  # type: ignore[union-attr]
    for n in g.nodes:
        if exempt is not None and id(n) in exempt:
            continue  # a layer kept in FP32 (and its guards): attributes and bodies as they are
        _convert_attrs(n, to, report)
        for sub in n.subgraphs():
            _convert(sub, to, report, keep, root=False)


def _convert_attrs(n: Node, to: DType, report: LoweringReport) -> None:
    schema = OPS[n.op].attrs
    for k, a in list(n.attrs.items()):
        kind = schema[k].kind if k in schema else None
        if kind is AttrKind.DTYPE and a is DType.FLOAT32 and k not in ACCUMULATION_ATTRS:
            n.attrs[k] = to
        elif kind is AttrKind.TENSOR and isinstance(a, torch.Tensor) and a.dtype == torch.float32:
            n.attrs[k] = _tensor(a, to, f"{n.name}.{k}", report)


def _retype(g: Graph, to: DType) -> None:
    for n in g.nodes:
        for sub in n.subgraphs():
            _retype(sub, to)
        for v, t in zip(n.outputs, infer_node(n, g, len(n.outputs))):
            if isinstance(t, TensorType) and isinstance(v.type, TensorType) and t.dtype != v.type.dtype:
                v.type = TensorType(t.dtype, v.type.shape)


def _cast_inputs(g: Graph, to: DType, exempt: set[int]) -> None:
    """FP32 graph inputs are cast to `to` on the way in (kept layers' guards read them as they are)."""
    for x in g.inputs:
        if not _is_f32(x):
            continue
        readers = [n for n in g.nodes if x in n.inputs and id(n) not in exempt]
        if not readers:
            continue
        cast = g.add("Cast", [x], {"to": to}, name=g.fresh_name(f"{x.name}_to_{to.value}"))[0]
        for n in readers:
            n.inputs = [cast if v is x else v for v in n.inputs]
        if x.name in g.layouts:  # convert the half-size copy, after the cast, not the FP32 input
            g.layouts[cast.name] = g.layouts.pop(x.name)
    g.toposort()


def _cast_outputs(g: Graph, to: DType) -> None:
    """Outputs that were FP32 are cast back on the way out."""
    for i, y in enumerate(list(g.outputs)):
        if not isinstance(y.type, TensorType) or y.type.dtype is not to or y.producer is None:
            continue
        name = y.name
        g.rename(y, g.fresh_name(f"{name}_{to.value}"))
        out = g.add("Cast", [y], {"to": DType.FLOAT32}, name=g.fresh_name(f"{name}_to_float32"))[0]
        g.rename(out, name)
        g.outputs[i] = out
    g.toposort()
