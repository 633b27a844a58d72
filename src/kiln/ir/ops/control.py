"""Op table entries: control flow (If, Loop, Scan) and the type joins they need.

Bodies are kiln Graphs held in GRAPH attributes; they may read values of enclosing graphs, and the reference
runs them through `RefCtx.run_graph` in the current scope. A value that may come from either of two places
(an If's branches, a loop-carried value before and after an iteration) gets the *join* of the two types: the
dtype must agree, dims that agree are kept and dims that differ become fresh symbols.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, OptionalType, SequenceType, Shape, TensorType, Value, ValueType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, const_value, register
from kiln.utils.errors import ExecutionError, ShapeError

Fresh = Callable[[], str]


# --- type joins ---------------------------------------------------------------------------------------


def join_type(a: ValueType, b: ValueType, fresh: Fresh) -> ValueType:
    """The most precise type holding every value of `a` and of `b`. Raises ShapeError when none exists."""
    if isinstance(a, OptionalType) or isinstance(b, OptionalType):
        ea = a.elem if isinstance(a, OptionalType) else a
        eb = b.elem if isinstance(b, OptionalType) else b
        return OptionalType(join_type(ea, eb, fresh))
    if isinstance(a, SequenceType) and isinstance(b, SequenceType):
        return SequenceType(join_type(a.elem, b.elem, fresh))
    if isinstance(a, TensorType) and isinstance(b, TensorType):
        if a.dtype is not b.dtype:
            raise ShapeError(f"types {a} and {b} have different element types")
        return TensorType(a.dtype, join_shape(a.shape, b.shape, fresh))
    raise ShapeError(f"types {a} and {b} cannot hold the same value")


def join_shape(a: Shape | None, b: Shape | None, fresh: Fresh) -> Shape | None:
    if a is None or b is None or len(a) != len(b):
        return None
    return tuple(x if x == y else fresh() for x, y in zip(a, b))


def join_all(types: Sequence[ValueType], fresh: Fresh) -> ValueType:
    out = types[0]
    for t in types[1:]:
        out = join_type(out, t, fresh)
    return out


def fresh_dims(t: ValueType, fresh: Fresh) -> ValueType:
    """`t` with every symbolic dim replaced by a fresh one. Sequence elements need this: one symbol in a
    sequence's element type does not stand for one size (each element may differ)."""
    if isinstance(t, TensorType):
        if t.shape is None:
            return t
        return TensorType(t.dtype, tuple(d if isinstance(d, int) else fresh() for d in t.shape))
    if isinstance(t, SequenceType):
        return SequenceType(fresh_dims(t.elem, fresh))
    return OptionalType(fresh_dims(t.elem, fresh))


def erase_shapes(t: ValueType) -> ValueType:
    """`t` with every tensor shape unknown (rank included)."""
    if isinstance(t, TensorType):
        return TensorType(t.dtype, None)
    if isinstance(t, SequenceType):
        return SequenceType(erase_shapes(t.elem))
    return OptionalType(erase_shapes(t.elem))


def _graph(ctx: InferCtx, attr: str) -> Graph:
    g = ctx.attrs[attr]
    if not isinstance(g, Graph):
        raise ctx.error(f"attribute '{attr}' must be a graph")
    return g


def _stack(values: list[Any], t: ValueType, axis: int = 0) -> Any:
    """Per-iteration values stacked along `axis`; an empty tensor of the right type when there are none."""
    if not isinstance(t, TensorType):
        raise ExecutionError(f"scan outputs must be tensors, got {t}")
    if values:
        if isinstance(values[0], np.ndarray):
            return np.stack(values, axis=axis)
        return torch.stack(values, dim=axis)
    shape = [0] if t.shape is None else [d if isinstance(d, int) else 0 for d in t.shape]
    shape[axis if t.shape is not None else 0] = 0
    if t.dtype is DType.STRING:
        return np.empty(shape, dtype=object)
    return torch.empty(shape, dtype=t.dtype.torch)


def _scalar(c: RefCtx, x: Any, what: str) -> Any:
    if x.numel() != 1:
        raise ExecutionError(f"node '{c.node.name}' ({c.node.op}): {what} must hold one value, got shape "
                             f"{list(x.shape)}")
    return x.reshape(-1)[0].item()


# --- If -------------------------------------------------------------------------------------------------


def _if_infer(ctx: InferCtx) -> list[ValueType]:
    then_g, else_g = _graph(ctx, "then_branch"), _graph(ctx, "else_branch")
    if len(then_g.outputs) != len(else_g.outputs):
        raise ctx.error(f"then_branch has {len(then_g.outputs)} outputs, else_branch {len(else_g.outputs)}")
    if ctx.dtype(0) is not DType.BOOL:
        raise ctx.error(f"cond must be bool, got {ctx.dtype(0)}")
    cond = ctx.const(0)
    if isinstance(cond, torch.Tensor) and cond.numel() == 1:
        taken = then_g if bool(cond.reshape(-1)[0]) else else_g
        return [v.type for v in taken.outputs]
    try:
        return [join_type(a.type, b.type, ctx.fresh) for a, b in zip(then_g.outputs, else_g.outputs)]
    except ShapeError as e:
        raise ctx.error(f"the branches' outputs disagree: {e.message}") from None


def _if_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    branch = c.attrs["then_branch"] if _scalar(c, xs[0], "cond") else c.attrs["else_branch"]
    return c.run_graph(branch, [])


register(
    "If", inputs=["cond"], outputs=["outputs+"], infer=_if_infer, ref=_if_ref,
    attrs={"then_branch": Attr(AttrKind.GRAPH), "else_branch": Attr(AttrKind.GRAPH)},
    doc="Runs then_branch when cond is true, else else_branch; the outputs are the branch's outputs.",
)


# --- Loop -----------------------------------------------------------------------------------------------


def _always_true(body: Graph) -> bool:
    """Whether the body's condition output is always true (its condition input passed on, or a constant)."""
    v: Value | None = body.outputs[0]
    while v is not None and v.producer is not None and v.producer.op == "Identity":
        v = v.producer.inputs[0]
    if v is not None and v is body.inputs[1]:
        return True
    c = const_value(v)
    return isinstance(c, torch.Tensor) and c.numel() == 1 and bool(c.reshape(-1)[0])


def _loop_trips(ctx: InferCtx, body: Graph) -> sym.Dim:
    """The iteration count when it is known before running (a constant M and a condition that stays true)."""
    m = ctx.const_ints(0)
    cond = ctx.const(1)
    cond_true = not ctx.has(1) or (isinstance(cond, torch.Tensor) and cond.numel() == 1 and bool(cond.all()))
    if m is not None and len(m) == 1 and cond_true and _always_true(body):
        return max(m[0], 0)
    return ctx.fresh("loop")


def _loop_infer(ctx: InferCtx) -> list[ValueType]:
    body = _graph(ctx, "body")
    n = ctx.n_inputs - 2
    if len(body.inputs) != n + 2 or len(body.outputs) < n + 1:
        raise ctx.error(f"the body takes {len(body.inputs)} inputs and gives {len(body.outputs)} outputs; "
                        f"with {n} loop-carried values it must take {n + 2} and give at least {n + 1}")
    for i, what in ((0, "M"), (1, "cond")):
        want = DType.INT64 if i == 0 else DType.BOOL
        if ctx.has(i) and ctx.dtype(i) is not want:
            raise ctx.error(f"{what} must be {want}, got {ctx.dtype(i)}")
    out: list[ValueType] = []
    for i in range(n):
        try:
            out.append(join_type(ctx.type(2 + i), body.outputs[1 + i].type, ctx.fresh))
        except ShapeError as e:
            raise ctx.error(f"loop-carried value {i}: {e.message}") from None
    trips = _loop_trips(ctx, body) if len(body.outputs) > n + 1 else 0
    for v in body.outputs[n + 1:]:
        t = v.type
        if not isinstance(t, TensorType):
            raise ctx.error(f"scan output '{v.name}' must be a tensor, got {t}")
        out.append(TensorType(t.dtype, None if t.shape is None else (trips, *t.shape)))
    return out


def _loop_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    body: Graph = c.attrs["body"]
    xs = xs + [None] * (2 - len(xs))
    trips = None if xs[0] is None else int(_scalar(c, xs[0], "M"))
    cond = True if xs[1] is None else bool(_scalar(c, xs[1], "cond"))
    carried = list(xs[2:])
    n = len(carried)
    scans: list[list[Any]] = [[] for _ in body.outputs[n + 1:]]
    device = next((x.device for x in xs if isinstance(x, torch.Tensor)), None)  # the body's inputs go there
    i = 0
    while cond and (trips is None or i < trips):
        step = [torch.tensor(i, dtype=torch.int64, device=device), torch.tensor(cond, device=device)]
        outs = c.run_graph(body, [*step, *carried])
        cond = bool(_scalar(c, outs[0], "the body's condition output"))
        carried = outs[1:n + 1]
        for acc, v in zip(scans, outs[n + 1:]):
            acc.append(v)
        i += 1
    return carried + [_stack(acc, c.out_type(n + k)) for k, acc in enumerate(scans)]


register(
    "Loop", inputs=["M?", "cond?", "v_initial*"], outputs=["v_final_and_scan_outputs+"],
    infer=_loop_infer, ref=_loop_ref, attrs={"body": Attr(AttrKind.GRAPH)},
    doc="Runs body while i < M and cond (either may be absent). The body maps (i, cond, carried...) to "
        "(cond, carried..., scan outputs...); scan outputs are stacked along a new first axis.",
)


# --- Scan -----------------------------------------------------------------------------------------------


def _scan_attrs(ctx: InferCtx | RefCtx, n_in: int, n_out: int) -> list[list[int]]:
    """scan_input_axes, scan_input_directions, scan_output_axes, scan_output_directions with defaults."""
    a = ctx.attrs
    lists = []
    for key, count in (("scan_input_axes", n_in), ("scan_input_directions", n_in),
                       ("scan_output_axes", n_out), ("scan_output_directions", n_out)):
        v = list(a[key]) if a[key] is not None else [0] * count
        if len(v) != count:
            raise ShapeError(f"node '{ctx.node.name}' (Scan): {key} has {len(v)} entries, {count} needed")
        if key.endswith("directions") and any(d not in (0, 1) for d in v):
            raise ShapeError(f"node '{ctx.node.name}' (Scan): {key} entries must be 0 or 1, got {v}")
        lists.append(v)
    return lists


def _scan_counts(ctx: InferCtx | RefCtx, n_inputs: int, body: Graph) -> tuple[int, int, int]:
    m = ctx.attrs["num_scan_inputs"]
    n = n_inputs - m
    k = len(body.outputs) - n
    if m < 1 or n < 0 or k < 0 or len(body.inputs) != n_inputs:
        raise ShapeError(f"node '{ctx.node.name}' (Scan): {n_inputs} inputs with num_scan_inputs={m} do not "
                         f"fit a body of {len(body.inputs)} inputs and {len(body.outputs)} outputs")
    return n, m, k


def _scan_infer(ctx: InferCtx) -> list[ValueType]:
    body = _graph(ctx, "body")
    n, m, k = _scan_counts(ctx, ctx.n_inputs, body)
    in_axes, _, out_axes, _ = _scan_attrs(ctx, m, k)
    length: sym.Dim | None = None
    for j in range(m):
        shape = ctx.shape(n + j)
        if shape is not None:
            d = shape[ctx.axis(in_axes[j], len(shape))]
            if length is None or (isinstance(d, int) and not isinstance(length, int)):
                length = d
    if length is None:
        length = ctx.fresh("scan")
    out: list[ValueType] = []
    for i in range(n):
        try:
            out.append(join_type(ctx.type(i), body.outputs[i].type, ctx.fresh))
        except ShapeError as e:
            raise ctx.error(f"state {i}: {e.message}") from None
    for j in range(k):
        t = body.outputs[n + j].type
        if not isinstance(t, TensorType):
            raise ctx.error(f"scan output {j} must be a tensor, got {t}")
        if t.shape is None:
            out.append(t)
            continue
        ax = ctx.axis(out_axes[j], len(t.shape), extra=1)
        out.append(TensorType(t.dtype, (*t.shape[:ax], length, *t.shape[ax:])))
    return out


def _take(x: Any, axis: int, i: int) -> Any:
    if isinstance(x, np.ndarray):
        return np.take(x, i, axis=axis)
    return x.select(axis, i)


def _scan_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    body: Graph = c.attrs["body"]
    n, m, k = _scan_counts(c, len(xs), body)
    in_axes, in_dirs, out_axes, out_dirs = _scan_attrs(c, m, k)
    seqs = xs[n:]
    axes = [a + x.ndim if a < 0 else a for a, x in zip(in_axes, seqs)]
    lengths = {x.shape[a] for a, x in zip(axes, seqs)}
    if len(lengths) != 1:
        raise ExecutionError(f"node '{c.node.name}' (Scan): scan input lengths differ: {sorted(lengths)}")
    steps = lengths.pop()
    states = list(xs[:n])
    acc: list[list[Any]] = [[] for _ in range(k)]
    for step in range(steps):
        slices = [_take(x, a, steps - 1 - step if d else step) for x, a, d in zip(seqs, axes, in_dirs)]
        outs = c.run_graph(body, states + slices)
        states = outs[:n]
        for j in range(k):
            acc[j].append(outs[n + j])
    results = list(states)
    for j in range(k):
        vals = acc[j][::-1] if out_dirs[j] else acc[j]
        t = c.out_type(n + j)
        rank = (t.rank if isinstance(t, TensorType) and t.rank is not None else
                (vals[0].ndim + 1 if vals else 1))
        axis = out_axes[j] + rank if out_axes[j] < 0 else out_axes[j]
        results.append(_stack(vals, t, axis))
    return results


register(
    "Scan", inputs=["initial_state_and_scan_inputs+"], outputs=["final_state_and_scan_outputs+"],
    infer=_scan_infer, ref=_scan_ref,
    attrs={
        "body": Attr(AttrKind.GRAPH),
        "num_scan_inputs": Attr(AttrKind.INT),
        "scan_input_axes": Attr(AttrKind.INTS, None),
        "scan_input_directions": Attr(AttrKind.INTS, None),
        "scan_output_axes": Attr(AttrKind.INTS, None),
        "scan_output_directions": Attr(AttrKind.INTS, None),
    },
    doc="ONNX Scan (opset 9+ semantics): states threaded through the body, scan inputs sliced along their "
        "axes, scan outputs stacked along theirs (reverse directions read or write back to front).",
)
