"""ONNX handlers: control flow (If, Loop, Scan) and SequenceMap, whose bodies need their input types given.

A loop body is imported with its loop-carried inputs typed like the initial values. When an iteration changes
a carried value's shape (a growing sequence, a tensor that gains a row), the body is imported again with the
dims that changed generalized to fresh symbols, until the body's outputs fit its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import torch

from kiln.frontend.onnx.context import NodeCtx
from kiln.frontend.onnx.handlers import onnx_op
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, OptionalType, SequenceType, TensorType, Value, ValueType
from kiln.ir.ops.control import erase_shapes
from kiln.ir.ops.sequence import body_input_types
from kiln.utils.errors import ShapeError

_MAX_WIDENINGS = 3


def _only(n: NodeCtx, allowed: Sequence[str]) -> None:
    for k in n.attrs:
        if k not in allowed:
            raise n.fail(f"attribute '{k}' is not supported by {n.op_type}-{n.since} "
                         f"(it knows: {', '.join(allowed)})")


def _tensor_type(n: NodeCtx, v: Value | None, what: str) -> ValueType:
    if v is None:
        raise n.fail(f"{what} is missing")
    return v.type


# --- body import with widening ------------------------------------------------------------------------


class _Widener:
    """Generalizes a carried type so that it also holds what the body gives back."""

    def __init__(self, n: NodeCtx) -> None:
        self.n = n
        self.symbols: set[str] = set()

    def __call__(self, t_in: ValueType, t_out: ValueType) -> ValueType:
        if isinstance(t_in, OptionalType) or isinstance(t_out, OptionalType):
            a = t_in.elem if isinstance(t_in, OptionalType) else t_in
            b = t_out.elem if isinstance(t_out, OptionalType) else t_out
            return OptionalType(self(a, b))
        if isinstance(t_in, SequenceType) and isinstance(t_out, SequenceType):
            return SequenceType(self(t_in.elem, t_out.elem))
        if not (isinstance(t_in, TensorType) and isinstance(t_out, TensorType)):
            raise self.n.fail(f"a loop-carried value is a {t_in} going in and a {t_out} coming out")
        if t_in.dtype is not t_out.dtype:
            raise self.n.fail(f"a loop-carried value is {t_in.dtype} going in and {t_out.dtype} coming out")
        if t_in.shape is None or t_out.shape is None or len(t_in.shape) != len(t_out.shape):
            return TensorType(t_in.dtype, None)
        return TensorType(t_in.dtype, tuple(a if a == b or a in self.symbols else self._fresh()
                                            for a, b in zip(t_in.shape, t_out.shape)))

    def _fresh(self) -> str:
        s = self.n.graph.fresh_dim("carried")
        self.symbols.add(s)
        return s


def import_body(
    n: NodeCtx,
    attr: str,
    before: list[ValueType],
    carried: list[ValueType],
    after: list[ValueType],
    out_offset: int,
    parent: Graph | None = None,
) -> Graph:
    """Import the body `attr` whose inputs are before + carried + after, where the body's outputs
    out_offset.. feed `carried` back. Carried types are widened until they hold what the body gives back."""
    gp = n.attrs.get(attr)
    if not isinstance(gp, onnx.GraphProto):
        raise n.fail(f"attribute '{attr}' must be a graph")
    widen = _Widener(n)
    types = list(carried)
    reported = len(n.importer.problems)
    for attempt in range(_MAX_WIDENINGS + 1):
        if attempt == _MAX_WIDENINGS:
            types = [erase_shapes(t) for t in types]
        del n.importer.problems[reported:]  # `kiln check` reports a body's problems once, not per import
        body = n.importer.import_subgraph(gp, parent or n.graph, n.scope, before + types + after,
                                          f"{n.name}/{attr}")
        if len(body.outputs) < out_offset + len(types):
            need = out_offset + len(types)
            raise n.fail(f"the body gives {len(body.outputs)} outputs, at least {need} needed")
        outs = [body.outputs[out_offset + i].type for i in range(len(types))]
        new = [widen(t, o) for t, o in zip(types, outs)]
        if new == types or attempt == _MAX_WIDENINGS:
            return body
        types = new
    raise AssertionError("unreachable")


# --- If -----------------------------------------------------------------------------------------------


@onnx_op("If", since=1)
def if_(n: NodeCtx) -> list[Value]:
    """All versions agree; later ones only admit more types (sequences, optionals, narrow floats)."""
    _only(n, ("then_branch", "else_branch"))
    if len(n.inputs) != 1 or n.inputs[0] is None:
        raise n.fail(f"If takes one input (cond), got {len(n.inputs)}")
    then_g = n.subgraph("then_branch", [])
    else_g = n.subgraph("else_branch", [])
    return n.emit("If", n.inputs, {"then_branch": then_g, "else_branch": else_g})


# --- Loop ---------------------------------------------------------------------------------------------


@onnx_op("Loop", since=1)
def loop(n: NodeCtx) -> list[Value]:
    """All versions agree (11 made M and cond optional, 13+ added sequence and optional carried values)."""
    _only(n, ("body",))
    if len(n.inputs) < 2:
        raise n.fail("Loop takes M and cond (either may be empty) before the loop-carried values")
    carried = [_tensor_type(n, v, f"loop-carried input {i}") for i, v in enumerate(n.inputs[2:])]
    scalar: list[ValueType] = [TensorType(DType.INT64, ()), TensorType(DType.BOOL, ())]
    body = import_body(n, "body", scalar, carried, [], 1)
    return n.emit("Loop", n.inputs, {"body": body})


# --- Scan ---------------------------------------------------------------------------------------------


def _drop_axis(n: NodeCtx, t: ValueType, axis: int, what: str) -> TensorType:
    if not isinstance(t, TensorType):
        raise n.fail(f"{what} must be a tensor, got {t}")
    if t.shape is None:
        return t
    r = len(t.shape)
    if not -r <= axis < r:
        raise n.fail(f"{what}: axis {axis} is out of range for rank {r}")
    a = axis + r if axis < 0 else axis
    return TensorType(t.dtype, t.shape[:a] + t.shape[a + 1:])


@onnx_op("Scan", since=9)
def scan(n: NodeCtx) -> list[Value]:
    """Opset 9+ (11 allows negative axes, 16 bfloat16): kiln's Scan."""
    _only(n, ("body", "num_scan_inputs", "scan_input_axes", "scan_input_directions", "scan_output_axes",
              "scan_output_directions"))
    m = int(n.attrs.get("num_scan_inputs", 0))
    n_state = len(n.inputs) - m
    if m < 1 or n_state < 0:
        raise n.fail(f"num_scan_inputs={m} does not fit {len(n.inputs)} inputs")
    axes = list(n.attrs.get("scan_input_axes") or [0] * m)
    if len(axes) != m:
        raise n.fail(f"scan_input_axes has {len(axes)} entries, num_scan_inputs is {m}")
    states = [_tensor_type(n, v, f"state {i}") for i, v in enumerate(n.inputs[:n_state])]
    slices: list[ValueType] = [
        _drop_axis(n, _tensor_type(n, v, f"scan input {j}"), axes[j], f"scan input {j}")
        for j, v in enumerate(n.inputs[n_state:])
    ]
    body = import_body(n, "body", [], states, slices, 0)
    attrs = {k: n.attrs[k] for k in n.attrs if k != "body"}
    return n.emit("Scan", n.inputs, {**attrs, "body": body})


@onnx_op("Scan", since=8)
def scan8(n: NodeCtx) -> list[Value]:
    """Scan-8 has a batch axis 0 on every input and output and scans axis 1. It becomes a Scan over the batch
    whose body is a Scan over the sequence (opset 9 semantics)."""
    _only(n, ("body", "num_scan_inputs", "directions"))
    m = int(n.attrs.get("num_scan_inputs", 0))
    rest = n.inputs[1:]
    n_state = len(rest) - m
    if m < 1 or n_state < 0:
        raise n.fail(f"num_scan_inputs={m} does not fit {len(rest)} inputs")
    directions = list(n.attrs.get("directions") or [0] * m)
    if len(directions) != m:
        raise n.fail(f"directions has {len(directions)} entries, num_scan_inputs is {m}")
    _check_sequence_lens(n, rest[n_state:])
    per_batch: list[ValueType] = [_drop_axis(n, _tensor_type(n, v, f"input {i}"), 0, f"input {i}")
                                  for i, v in enumerate(rest)]
    outer = Graph(f"{n.name}/batch", parent=n.graph)
    outer_ins = [outer.add_input(f"{n.name}/batch_in{i}", t) for i, t in enumerate(per_batch)]
    slices: list[ValueType] = [_drop_axis(n, t, 0, f"scan input {j}")
                               for j, t in enumerate(per_batch[n_state:])]
    body = import_body(n, "body", [], per_batch[:n_state], slices, 0, parent=outer)
    try:
        outer.outputs = outer.add("Scan", outer_ins, {"body": body, "num_scan_inputs": m,
                                                      "scan_input_directions": tuple(directions)},
                                  name=outer.fresh_name(f"{n.name}/sequence_scan"), outputs=len(body.outputs))
    except ShapeError as e:
        raise n.fail(e.message) from None
    return n.emit("Scan", rest, {"body": outer, "num_scan_inputs": len(rest)})


def _check_sequence_lens(n: NodeCtx, scan_inputs: list[Value | None]) -> None:
    """sequence_lens is supported only where it changes nothing: every length is the full sequence."""
    v = n.input(0)
    if v is None:
        return
    lens = v.data if v.data is not None else n.const_input(0)
    full = {t.shape[1] for t in (x.type for x in scan_inputs if x is not None)
            if isinstance(t, TensorType) and t.shape is not None and len(t.shape) > 1}
    if isinstance(lens, torch.Tensor) and len(full) == 1:
        length = full.pop()
        if isinstance(length, int) and bool((lens == length).all()):
            return
    raise n.fail("sequence_lens shorter than the sequence (or not constant) is not supported",
                 hint="re-export the model with opset 9 or newer")


# --- SequenceMap --------------------------------------------------------------------------------------


@onnx_op("SequenceMap", since=17)
def sequence_map(n: NodeCtx) -> list[Value]:
    _only(n, ("body",))
    types = [_tensor_type(n, v, f"input {i}") for i, v in enumerate(n.inputs)]
    body = n.subgraph("body", body_input_types(types, lambda: n.graph.fresh_dim("elem")))
    return n.emit("SequenceMap", n.inputs, {"body": body})
