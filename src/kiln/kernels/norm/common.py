"""What the Triton norm tactics share: the CUDA-and-Triton gate, node checks, the tuning space, the launch plan
(how rows are tiled onto programs) and the reference as a fallback for run-time corner cases.

This module never imports triton: the tactics must load (and say "not applicable") where it is missing."""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, TensorType, Value
from kiln.ir.ops import get_op
from kiln.ir.ops.base import RefCtx
from kiln.kernels.base import Kernel, Tactic
from kiln.kernels.pointwise.rules import reciprocal

FLOATS = frozenset({DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16})

SPACE: dict[str, Sequence[Any]] = {
    "tile": [2048, 4096, 8192],
    "per_thread": [16, 8],
    "max_row": [16384, 8192],
}
"""The shared tuning space (first values = the untimed default, the fastest at BERT/LLaMA shapes on an H100):
- `tile`: elements one program holds when rows are short: `tile // row` rows to a program;
- `per_thread`: elements per thread, which sets num_warps (clamped to 1..16);
- `max_row`: the longest row kept in registers for a single read and write of every element; longer rows (and
  large groups) are streamed in chunks of `max_row // 2`."""


@functools.cache
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as none
        return False


class TritonTactic(Tactic):
    """A CUDA tactic made of Triton kernels; subclasses say which nodes they take in `supports`."""

    devices: ClassVar[frozenset[str]] = frozenset({"cuda"})
    space: ClassVar[dict[str, Sequence[Any]]] = SPACE
    priority: ClassVar[int] = 50

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and triton_available() and self.supports(node)

    def supports(self, node: Node) -> bool:
        """Whether the kernels compute `node` as the reference does (up to float32 rounding)."""
        raise NotImplementedError


# --- node checks ----------------------------------------------------------------------------------------


def tensor_type(v: Value | None) -> TensorType | None:
    return v.type if v is not None and isinstance(v.type, TensorType) else None


def present(node: Node, i: int) -> bool:
    return i < len(node.inputs) and node.inputs[i] is not None


def dtype(node: Node, i: int) -> DType | None:
    t = tensor_type(node.inputs[i]) if present(node, i) else None
    return None if t is None else t.dtype


def out_dtype(node: Node, i: int = 0) -> DType | None:
    t = tensor_type(node.outputs[i]) if i < len(node.outputs) else None
    return None if t is None else t.dtype


def shape(node: Node, i: int) -> tuple[Any, ...] | None:
    t = tensor_type(node.inputs[i]) if present(node, i) else None
    return None if t is None or t.shape is None else tuple(t.shape)


def floats(node: Node, inputs: Sequence[int]) -> bool:
    """Every listed input that is present, and output 0, is float32, float16 or bfloat16."""
    types = [dtype(node, i) for i in inputs if present(node, i)] + [out_dtype(node)]
    return all(t in FLOATS for t in types)


def norm_axis(axis: int, rank: int) -> int | None:
    return axis + rank if -rank <= axis < 0 else axis if 0 <= axis < rank else None


def static_ints(dims: Sequence[Any]) -> bool:
    return all(isinstance(d, int) for d in dims)


# --- the launch plan --------------------------------------------------------------------------------------


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def warps(elements: int, per_thread: int) -> int:
    return max(1, min(16, next_pow2(elements // (32 * per_thread))))


@dataclass(frozen=True)
class Plan:
    """How rows of `n` elements map onto programs: `rows` rows of `block` lanes a program (one read and one write
    of every element), or, when `looped`, one row a program streamed in chunks of `block` lanes."""

    rows: int
    block: int
    looped: bool
    num_warps: int


def plan(n: int, config: dict[str, Any]) -> Plan:
    tile, per_thread, max_row = config["tile"], config["per_thread"], config["max_row"]
    block = next_pow2(n)
    if block > max_row:
        # why: a streamed row needs many loads in flight per program, more than a short-row tile does
        chunk = max(next_pow2(max_row) // 2, 1)
        return Plan(1, chunk, True, warps(chunk, per_thread))
    rows = max(1, tile // block)
    return Plan(rows, block, False, warps(rows * block, per_thread))


def grid_rows(n_rows: int, p: Plan) -> tuple[int]:
    return ((n_rows + p.rows - 1) // p.rows,)


# --- dtypes and the fallback --------------------------------------------------------------------------------


def promote(*dts: torch.dtype) -> torch.dtype:
    """torch's result dtype for arithmetic on tensors of these dtypes."""
    out = dts[0]
    for d in dts[1:]:
        out = torch.promote_types(out, d)
    return out


def reference(node: Node) -> Kernel:
    """The op table's reference for `node`: empty tensors and run-time shape surprises go here."""
    ref = get_op(node.op).ref
    ctx = RefCtx(node)
    return lambda xs: list(ref(ctx, xs))


# --- an op that quantizes its own result ("quantizing" Fused nodes) -----------------------------------------------

WRITTEN = frozenset({DType.INT8, DType.UINT8, DType.FLOAT8_E4M3FN})
"""The 8-bit types the kernels write for a "quantizing" node (`triton_kernels.QUANT_RANGES`)."""


@dataclass(frozen=True)
class QuantizedOutput:
    """A "quantizing" Fused node (`kiln.precision.quantize.fuse_output_quantize`) in a kernel's terms: the op and
    the QuantizeLinear body nodes, the node input index of each body input, whether the node outputs the float
    result too, and the quantize's scale, zero point and division type (`precision`)."""

    op: Node
    quantize: Node
    at: dict[Value, int]
    keep_y: bool
    scale: float
    zero: float
    precision: torch.dtype
    reciprocal: float
    """1 / scale in float32 (`rules.reciprocal`, finite), for `km.quotient`."""


def quantizing_view(node: Node, ops: Sequence[str]) -> QuantizedOutput | None:
    """The view of a "quantizing" Fused node whose op is one of `ops`, its QuantizeLinear per tensor with a constant
    positive scale and zero point, to a type in `WRITTEN` (float8 saturating, zero point 0); else None."""
    if node.op != "Fused" or node.attrs.get("kind") != "quantizing":
        return None
    body = node.attrs["body"]
    if len(body.nodes) != 2 or body.nodes[0].op not in ops:
        return None
    op, q = body.nodes
    if q.op != "QuantizeLinear" or q.inputs[0] is not op.outputs[0] or len(op.outputs) != 1:
        return None
    at = {v: i for i, v in enumerate(body.inputs)}
    values: list[float] = []
    for v in q.inputs[1:3]:
        c = node.inputs[at[v]] if v is not None and v in at else None
        if v is not None and (c is None or not isinstance(c.data, torch.Tensor) or c.data.numel() != 1):
            return None  # per-channel or computed scales: the quantize pass keeps them
        values.append(0.0 if c is None else float(c.data.float().reshape(())))  # type: ignore[union-attr]
    inverse = reciprocal(values[0]) if values and values[0] > 0 else math.inf
    if not math.isfinite(inverse):
        return None  # a scale not positive, or whose float32 reciprocal (km.quotient's factor) overflows: < ~2.9e-39
    zero = values[1] if len(values) > 1 else 0.0
    out = q.outputs[0].dtype
    if out not in WRITTEN or (out is DType.FLOAT8_E4M3FN and (int(q.attrs.get("saturate", 1)) != 1 or zero != 0)):
        return None
    keep = body.outputs == [op.outputs[0], q.outputs[0]]
    if not keep and body.outputs != [q.outputs[0]]:
        return None
    p = q.attrs.get("precision") or q.inputs[1].dtype  # the reference divides in this type
    precision = p.torch if p in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16) else torch.float32
    return QuantizedOutput(op, q, at, keep, values[0], zero, precision, inverse)


def separate_quantize(view: QuantizedOutput, device: torch.device) -> Kernel:
    """The node's QuantizeLinear alone (a one-node graph with its constants) on its best-ranked GPU tactic, as a
    kernel [Y] -> [Y quantized]: what ran before the fusion, kept as the tuner's other choice."""
    from kiln.ir.graph import Graph
    from kiln.kernels import registry

    q = view.quantize
    g = Graph()
    y = g.add_input("y", q.inputs[0].type)  # type: ignore[union-attr]
    s = g.add_initializer("scale", torch.tensor(view.scale, dtype=q.inputs[1].dtype.torch))  # type: ignore[union-attr]
    ins = [y, s]
    if len(q.inputs) > 2 and q.inputs[2] is not None:
        ins.append(g.add_initializer("zero", torch.tensor(view.zero).to(q.inputs[2].dtype.torch)))
    (out,) = g.add("QuantizeLinear", ins, dict(q.attrs), name=q.name)
    g.outputs.append(out)
    alone = g.nodes[0]
    kernel = registry.first_kernel(alone, device)
    consts: dict[torch.device, list[torch.Tensor]] = {}

    def run(xs: list[Any]) -> list[Any]:  # the constants follow Y to its device
        x = xs[0]
        on = consts.get(x.device) or consts.setdefault(x.device, [v.data.to(x.device) for v in ins[1:]])  # type: ignore[union-attr]
        return kernel([x, *on])

    return run
