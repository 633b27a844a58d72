"""Op table entries: sequences and optionals.

A sequence value is a Python list of tensors (never mutated: every op builds a new list); an empty optional is
None and a full one is its element. A sequence's element type covers every element, so a symbolic dim in it
does not name one size: values taken out of a sequence get fresh symbols for those dims.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, OptionalType, SequenceType, TensorType, ValueType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register
from kiln.ir.ops.control import fresh_dims, join_all
from kiln.utils.errors import ExecutionError, ShapeError


def _seq(ctx: InferCtx, i: int) -> SequenceType:
    t = ctx.type(i)
    if not isinstance(t, SequenceType):
        raise ctx.error(f"input {i} must be a sequence, got {t}")
    return t


def _elem(ctx: InferCtx, i: int) -> TensorType:
    t = _seq(ctx, i).elem
    if not isinstance(t, TensorType):
        raise ctx.error(f"sequences of {t} are not supported")
    return t


def _arg(xs: list[Any], i: int) -> Any:
    """Input i, or None when it is omitted (trailing optional inputs may be absent altogether)."""
    return xs[i] if i < len(xs) else None


def _position(c: RefCtx, pos: Any, length: int, *, inclusive_end: bool) -> int:
    """A position input as an index: negative counts from the back; the end is valid only for insertion."""
    if pos.numel() != 1:
        raise ExecutionError(f"node '{c.node.name}' ({c.node.op}): position must be a scalar")
    p = int(pos.reshape(-1)[0])
    hi = length if inclusive_end else length - 1
    if not -length <= p <= hi:
        raise ExecutionError(
            f"node '{c.node.name}' ({c.node.op}): position {p} is out of range for a sequence of {length}")
    return p + length if p < 0 else p


def _check_position(ctx: InferCtx, i: int) -> None:
    if ctx.has(i):
        dt = ctx.dtype(i)
        if dt not in (DType.INT32, DType.INT64):
            raise ctx.error(f"position must be int32 or int64, got {dt}")
        if ctx.rank(i) not in (None, 0) and ctx.shape(i) != (1,):
            raise ctx.error(f"position must be a scalar, got shape {ctx.shape(i)}")


# --- building and editing -----------------------------------------------------------------------------


def _construct_infer(ctx: InferCtx) -> list[ValueType]:
    types = [ctx.tensor(i) for i in range(ctx.n_inputs)]
    try:
        return [SequenceType(join_all(types, ctx.fresh))]
    except ShapeError as e:
        raise ctx.error(f"the inputs disagree: {e.message}") from None


register("SequenceConstruct", inputs=["inputs+"], outputs=["output_sequence"], infer=_construct_infer,
         ref=lambda c, xs: [list(xs)], doc="A sequence of the input tensors (all of one dtype).")


def _empty_infer(ctx: InferCtx) -> list[ValueType]:
    return [SequenceType(TensorType(ctx.attrs["dtype"], None))]


register("SequenceEmpty", inputs=[], outputs=["output"], infer=_empty_infer, ref=lambda c, xs: [[]],
         attrs={"dtype": Attr(AttrKind.DTYPE, DType.FLOAT32)}, doc="An empty sequence of `dtype` tensors.")


def _at_infer(ctx: InferCtx) -> list[ValueType]:
    _check_position(ctx, 1)
    return [fresh_dims(_elem(ctx, 0), ctx.fresh)]


def _at_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    return [xs[0][_position(c, xs[1], len(xs[0]), inclusive_end=False)]]


register("SequenceAt", inputs=["input_sequence", "position"], outputs=["tensor"], infer=_at_infer,
         ref=_at_ref, doc="The element at `position` (negative counts from the back).")


def _insert_infer(ctx: InferCtx) -> list[ValueType]:
    _check_position(ctx, 2)
    elem, t = _elem(ctx, 0), ctx.tensor(1)
    if elem.dtype is not t.dtype:
        raise ctx.error(f"cannot insert a {t.dtype} tensor into a sequence of {elem.dtype}")
    return [SequenceType(join_all([elem, t], ctx.fresh))]


def _insert_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    seq = list(xs[0])
    pos = len(seq) if _arg(xs, 2) is None else _position(c, xs[2], len(seq), inclusive_end=True)
    seq.insert(pos, xs[1])
    return [seq]


register("SequenceInsert", inputs=["input_sequence", "tensor", "position?"], outputs=["output_sequence"],
         infer=_insert_infer, ref=_insert_ref,
         doc="A copy with `tensor` inserted at `position` (default: at the end).")


def _erase_infer(ctx: InferCtx) -> list[ValueType]:
    _check_position(ctx, 1)
    return [_seq(ctx, 0)]


def _erase_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    seq = list(xs[0])
    if not seq:
        raise ExecutionError(f"node '{c.node.name}' (SequenceErase): the sequence is empty")
    del seq[-1 if _arg(xs, 1) is None else _position(c, xs[1], len(seq), inclusive_end=False)]
    return [seq]


register("SequenceErase", inputs=["input_sequence", "position?"], outputs=["output_sequence"],
         infer=_erase_infer, ref=_erase_ref,
         doc="A copy without the element at `position` (default: the last).")


def _length_infer(ctx: InferCtx) -> list[ValueType]:
    _seq(ctx, 0)
    return [TensorType(DType.INT64, ())]


register("SequenceLength", inputs=["input_sequence"], outputs=["length"], infer=_length_infer,
         ref=lambda c, xs: [torch.tensor(len(xs[0]), dtype=torch.int64)],
         doc="The number of elements (int64 scalar).")


# --- splitting and concatenating ----------------------------------------------------------------------


def _split_elem_dim(ctx: InferCtx, dim: sym.Dim) -> sym.Dim | None:
    """The split axis' size in every element, when one size fits all; None when the axis is dropped."""
    if not ctx.has(1):
        return 1 if ctx.attrs["keepdims"] else None
    if ctx.rank(1) not in (None, 0, 1):
        raise ctx.error(f"split must be a scalar or 1-D, got rank {ctx.rank(1)}")
    split = ctx.const_ints(1)
    if split is None:
        return ctx.fresh("split")
    if ctx.rank(1) == 0:
        size = split[0]
        fits = isinstance(dim, int) and size > 0 and dim % size == 0
        return size if fits else ctx.fresh("split")
    return split[0] if split and all(s == split[0] for s in split) else ctx.fresh("split")


def _split_infer(ctx: InferCtx) -> list[ValueType]:
    t = ctx.tensor(0)
    if t.shape is None:
        return [SequenceType(TensorType(t.dtype, None))]
    axis = ctx.axis(ctx.attrs["axis"], len(t.shape))
    d = _split_elem_dim(ctx, t.shape[axis])
    dims = list(t.shape)
    if d is None:
        del dims[axis]
    else:
        dims[axis] = d
    return [SequenceType(TensorType(t.dtype, tuple(dims)))]


def _split_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, split = xs[0], _arg(xs, 1)
    axis = c.attrs["axis"] + x.ndim if c.attrs["axis"] < 0 else c.attrs["axis"]
    size = x.shape[axis]
    if split is None:
        parts = list(torch.split(x, 1, dim=axis))
        return [[p.squeeze(axis) for p in parts] if not c.attrs["keepdims"] else parts]
    sizes = [int(s) for s in split.reshape(-1).tolist()]
    if any(s < 0 for s in sizes) or (split.ndim == 0 and sizes[0] <= 0):
        raise ExecutionError(f"node '{c.node.name}' (SplitToSequence): split sizes must be positive: {sizes}")
    if split.ndim == 0:
        return [list(torch.split(x, sizes[0], dim=axis))]
    if sum(sizes) != size:
        raise ExecutionError(
            f"node '{c.node.name}' (SplitToSequence): split sizes {sizes} do not add up to the axis' {size}")
    return [list(torch.split(x, sizes, dim=axis))]


register(
    "SplitToSequence", inputs=["input", "split?"], outputs=["output_sequence"], infer=_split_infer,
    ref=_split_ref,
    attrs={"axis": Attr(AttrKind.INT, 0), "keepdims": Attr(AttrKind.INT, 1, choices=(0, 1))},
    doc="Splits along axis into chunks of `split` (scalar: equal chunks, the last may be shorter; 1-D: the "
        "sizes); without `split`, into size-1 pieces, squeezed unless keepdims.",
)


def _concat_infer(ctx: InferCtx) -> list[ValueType]:
    elem = fresh_dims(_elem(ctx, 0), ctx.fresh)
    assert isinstance(elem, TensorType)
    if elem.shape is None:
        return [TensorType(elem.dtype, None)]
    new_axis = ctx.attrs["new_axis"]
    axis = ctx.axis(ctx.attrs["axis"], len(elem.shape), extra=new_axis)
    dims: list[sym.Dim] = list(elem.shape)
    if new_axis:
        dims.insert(axis, ctx.fresh("seq"))
    else:
        dims[axis] = ctx.fresh("concat")
    return [TensorType(elem.dtype, tuple(dims))]


def _concat_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    seq = xs[0]
    if not seq:
        raise ExecutionError(f"node '{c.node.name}' (ConcatFromSequence): the sequence is empty")
    new_axis = c.attrs["new_axis"]
    rank = seq[0].ndim + new_axis
    axis = c.attrs["axis"] + rank if c.attrs["axis"] < 0 else c.attrs["axis"]
    if isinstance(seq[0], np.ndarray):
        return [np.stack(seq, axis=axis) if new_axis else np.concatenate(seq, axis=axis)]
    return [torch.stack(seq, dim=axis) if new_axis else torch.cat(seq, dim=axis)]


register(
    "ConcatFromSequence", inputs=["input_sequence"], outputs=["concat_result"], infer=_concat_infer,
    ref=_concat_ref,
    attrs={"axis": Attr(AttrKind.INT), "new_axis": Attr(AttrKind.INT, 0, choices=(0, 1))},
    doc="Concatenates the elements along axis (stacks them along a new axis with new_axis=1).",
)


# --- SequenceMap --------------------------------------------------------------------------------------


def body_input_types(types: list[ValueType], fresh: Any) -> list[ValueType]:
    """What SequenceMap's body sees for each input: a sequence's element, or the tensor itself."""
    return [fresh_dims(t.elem, fresh) if isinstance(t, SequenceType) else t for t in types]


def _map_infer(ctx: InferCtx) -> list[ValueType]:
    body = ctx.attrs["body"]
    assert isinstance(body, Graph)
    _seq(ctx, 0)
    if len(body.inputs) != ctx.n_inputs:
        raise ctx.error(f"the body takes {len(body.inputs)} inputs, the node gives {ctx.n_inputs}")
    return [SequenceType(v.type) for v in body.outputs]


def _map_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    lengths = {len(x) for x in xs if isinstance(x, list)}
    if len(lengths) != 1:
        raise ExecutionError(f"node '{c.node.name}' (SequenceMap): the sequences' lengths differ: {lengths}")
    body = c.attrs["body"]
    outs: list[list[Any]] = [[] for _ in body.outputs]
    for i in range(lengths.pop()):
        res = c.run_graph(body, [x[i] if isinstance(x, list) else x for x in xs])
        for acc, r in zip(outs, res):
            acc.append(r)
    return outs


register(
    "SequenceMap", inputs=["input_sequence", "additional_inputs*"], outputs=["out_sequence+"],
    infer=_map_infer, ref=_map_ref, attrs={"body": Attr(AttrKind.GRAPH)},
    doc="Runs body once per element (sequence inputs give their i-th element, tensors themselves); each body "
        "output becomes a sequence.",
)


# --- optionals ----------------------------------------------------------------------------------------


def _optional_infer(ctx: InferCtx) -> list[ValueType]:
    if ctx.has(0):
        t = ctx.type(0)
        if isinstance(t, OptionalType):
            raise ctx.error(f"the input is already optional ({t})")
        return [OptionalType(t)]
    t = ctx.attrs["type"]
    if t is None:
        raise ctx.error("an empty Optional needs the 'type' attribute")
    return [OptionalType(t)]


register(
    "Optional", inputs=["input?"], outputs=["output"], infer=_optional_infer, ref=lambda c, xs: [_arg(xs, 0)],
    attrs={"type": Attr(AttrKind.TYPE, None)},
    doc="An optional holding the input, or an empty optional of `type` when there is no input.",
)


def _get_infer(ctx: InferCtx) -> list[ValueType]:
    t = ctx.type(0)
    return [t.elem if isinstance(t, OptionalType) else t]


def _get_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    if xs[0] is None:
        raise ExecutionError(f"node '{c.node.name}' (OptionalGetElement): the optional is empty")
    return [xs[0]]


register("OptionalGetElement", inputs=["input"], outputs=["output"], infer=_get_infer, ref=_get_ref,
         doc="The element of an optional (a tensor or sequence input is returned as is).")


register(
    "OptionalHasElement", inputs=["input?"], outputs=["output"],
    infer=lambda ctx: [TensorType(DType.BOOL, ())],
    ref=lambda c, xs: [torch.tensor(_arg(xs, 0) is not None)],
    doc="Whether the input holds a value (false for an empty optional or a missing input).",
)

