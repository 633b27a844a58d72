"""Graphs as plain data: JSON-ready dicts plus a dict of named tensors (stored as safetensors in engine files).

The engine file keeps the optimized graph this way (so an engine can be re-tuned for another GPU) and the plan
refers to its nodes. Decoding never executes anything: attributes are rebuilt by each op's attribute schema.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, OptionalType, SequenceType, TensorType, Value, ValueType
from kiln.ir.ops import AttrKind, get_op
from kiln.utils.errors import EngineFileError

Weights = dict[str, torch.Tensor]


# --- types ------------------------------------------------------------------------------------------------


def type_to_json(t: ValueType) -> dict[str, Any]:
    if isinstance(t, SequenceType):
        return {"sequence": type_to_json(t.elem)}
    if isinstance(t, OptionalType):
        return {"optional": type_to_json(t.elem)}
    return {"dtype": t.dtype.value, "shape": None if t.shape is None else list(t.shape)}


def type_from_json(d: dict[str, Any]) -> ValueType:
    if "sequence" in d:
        return SequenceType(type_from_json(d["sequence"]))
    if "optional" in d:
        return OptionalType(type_from_json(d["optional"]))
    shape = d["shape"]
    return TensorType(DType(d["dtype"]), None if shape is None else tuple(shape))


# --- constants --------------------------------------------------------------------------------------------


def _const_to_json(data: Any, key: str, weights: Weights) -> dict[str, Any]:
    if isinstance(data, np.ndarray):  # strings: inline
        return {"strings": data.astype(str).tolist(), "shape": list(data.shape)}
    weights[key] = data.detach().cpu().contiguous()
    return {"weight": key}


def _const_from_json(d: dict[str, Any], weights: Weights) -> Any:
    if "strings" in d:
        return np.array(d["strings"], dtype=object).reshape(d["shape"])
    try:
        return weights[d["weight"]]
    except KeyError:
        raise EngineFileError(f"the engine refers to weight '{d['weight']}', which it does not contain") from None


# --- attributes -------------------------------------------------------------------------------------------


def _attr_to_json(kind: AttrKind, v: Any, key: str, weights: Weights) -> Any:
    if v is None:
        return None
    if kind is AttrKind.TENSOR:
        return _const_to_json(v, key, weights)
    if kind is AttrKind.GRAPH:
        return graph_to_json(v, weights, prefix=f"{key}/")
    if kind is AttrKind.DTYPE:
        return v.value
    if kind is AttrKind.TYPE:
        return type_to_json(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def _attr_from_json(kind: AttrKind, v: Any, weights: Weights, parent: Graph, scope: dict[str, Value]) -> Any:
    if v is None:
        return None
    if kind is AttrKind.TENSOR:
        return _const_from_json(v, weights)
    if kind is AttrKind.GRAPH:
        return _graph_from_json(v, weights, parent, scope)
    if kind is AttrKind.DTYPE:
        return DType(v)
    if kind is AttrKind.TYPE:
        return type_from_json(v)
    if kind in (AttrKind.INTS, AttrKind.FLOATS, AttrKind.STRINGS):
        return tuple(v)
    return v


# --- graphs -----------------------------------------------------------------------------------------------


def graph_to_json(g: Graph, weights: Weights, prefix: str = "") -> dict[str, Any]:
    """The graph as a dict; tensors go into `weights` under keys starting with `prefix`."""
    inits = [{"name": v.name, "type": type_to_json(v.type), **_const_to_json(v.data, f"{prefix}{v.name}", weights)}
             for v in g.initializers.values()]
    nodes = []
    for n in g.nodes:
        schema = get_op(n.op).attrs
        attrs = {k: _attr_to_json(schema[k].kind, v, f"{prefix}{n.name}.{k}", weights)
                 for k, v in n.attrs.items() if v is not None}
        nodes.append({
            "name": n.name,
            "op": n.op,
            "inputs": [None if v is None else v.name for v in n.inputs],
            "outputs": [{"name": v.name, "type": type_to_json(v.type)} for v in n.outputs],
            "attrs": attrs,
        })
    return {
        "name": g.name,
        "opset": g.opset,
        "metadata": dict(g.metadata),
        "layouts": dict(sorted(g.layouts.items())),
        "inputs": [{"name": v.name, "type": type_to_json(v.type)} for v in g.inputs],
        "initializers": inits,
        "nodes": nodes,
        "outputs": [v.name for v in g.outputs],
    }


def graph_from_json(d: dict[str, Any], weights: Weights) -> Graph:
    try:
        return _graph_from_json(d, weights, None, {})
    except (KeyError, TypeError, ValueError) as e:
        raise EngineFileError(f"the engine's graph is malformed ({type(e).__name__}: {e})",
                              hint="rebuild the engine") from None


def _graph_from_json(d: dict[str, Any], weights: Weights, parent: Graph | None,
                     outer: dict[str, Value]) -> Graph:
    g = Graph(d["name"], parent=parent)
    g.opset = d.get("opset")
    g.metadata.update(d.get("metadata", {}))
    g.layouts.update({str(k): str(v) for k, v in d.get("layouts", {}).items()})
    scope = dict(outer)
    for i in d["inputs"]:
        v = Value(i["name"], type_from_json(i["type"]))
        g.use_name(v.name)
        g.inputs.append(v)
        scope[v.name] = v
    for i in d["initializers"]:
        v = Value(i["name"], type_from_json(i["type"]), _const_from_json(i, weights))
        g.use_name(v.name)
        g.initializers[v.name] = v
        scope[v.name] = v
    for nd in d["nodes"]:
        opdef = get_op(nd["op"])
        attrs = {k: _attr_from_json(opdef.attrs[k].kind, v, weights, g, scope) for k, v in nd["attrs"].items()}
        node = Node(nd["op"], [None if x is None else scope[x] for x in nd["inputs"]], [],
                    opdef.check_attrs(attrs, nd["name"]), nd["name"])
        for o in nd["outputs"]:
            v = Value(o["name"], type_from_json(o["type"]))
            v.producer = node
            g.use_name(v.name)
            node.outputs.append(v)
            scope[v.name] = v
        g.use_name(node.name)
        g.nodes.append(node)
    g.outputs = [scope[name] for name in d["outputs"]]
    return g
