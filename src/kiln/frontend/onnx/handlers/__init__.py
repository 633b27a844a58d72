"""ONNX op handlers, registered per op and per op version (the schema's since_version).

A handler registered with `since=N` handles every version of the op from N up to the next registered handler.
Ops without a handler map onto the kiln op of the same name (`default_handler`), which is right whenever the
ONNX op and kiln's op agree; handlers exist where an ONNX version differs (attributes that became inputs,
legacy semantics) or where the ONNX op lowers to other kiln ops.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import onnx

from kiln.frontend.onnx.context import Handler, NodeCtx
from kiln.frontend.onnx.tensors import dtype_from_onnx, type_from_onnx
from kiln.ir.graph import Value
from kiln.ir.ops import AttrKind, get_op

_HANDLERS: dict[tuple[str, str], list[tuple[int, Handler]]] = {}

LEGACY_IGNORED = frozenset({"consumed_inputs"})
"""Attributes of old op versions that carry no meaning for inference (opset <= 5 memory hints)."""


def onnx_op(op_type: str, since: int = 1, domain: str = "") -> Callable[[Handler], Handler]:
    """Register a handler for `op_type` versions from `since` on."""

    def deco(fn: Handler) -> Handler:
        entries = _HANDLERS.setdefault((domain, op_type), [])
        if any(s == since for s, _ in entries):
            raise ValueError(f"handler for {op_type} since {since} registered twice")
        entries.append((since, fn))
        entries.sort(key=lambda e: e[0])
        return fn

    return deco


def find_handler(domain: str, op_type: str, since: int) -> Handler | None:
    entries = _HANDLERS.get((domain, op_type))
    if not entries:
        return None
    i = bisect.bisect_right([s for s, _ in entries], since) - 1
    return entries[i][1] if i >= 0 else None


def handled_ops() -> list[tuple[str, str]]:
    return sorted(_HANDLERS)


def convert_attr(n: NodeCtx, kind: AttrKind, name: str, v: Any) -> Any:
    """An ONNX attribute value as the kiln attribute kind."""
    if kind is AttrKind.DTYPE and isinstance(v, int):
        return dtype_from_onnx(v, f"attribute '{name}'")
    if kind is AttrKind.GRAPH:
        return n.subgraph(name)
    if kind is AttrKind.TYPE and isinstance(v, onnx.TypeProto):
        return type_from_onnx(v, lambda: n.graph.fresh_dim(name), f"attribute '{name}'")
    return v


def default_handler(n: NodeCtx) -> list[Value]:
    opdef = get_op(n.op_type)
    attrs: dict[str, Any] = {}
    for k, v in n.attrs.items():
        if k in LEGACY_IGNORED:
            continue
        spec = opdef.attrs.get(k)
        if spec is None:
            raise n.fail(f"attribute '{k}' is not supported by kiln's {n.op_type}")
        attrs[k] = convert_attr(n, spec.kind, k, v)
    return n.emit(n.op_type, n.inputs, attrs)


# Handler modules register themselves on import.
from kiln.frontend.onnx.handlers import (  # noqa: E402, F401  isort: skip
    elementwise,
    tensor,
    reduce,
    nn,
    control,
    misc,
    rnn,
    contrib,
    llm,
    qoperator,
)
