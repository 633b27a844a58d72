"""`triton.layernorm` and `triton.rmsnorm`: LayerNormalization and RMSNormalization over the trailing axes
[axis, rank), float32 statistics, one read and one write of every element when a row fits in registers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner
from kiln.kernels.norm.common import (
    SPACE,
    QuantizedOutput,
    TritonTactic,
    floats,
    norm_axis,
    present,
    quantizing_view,
    reference,
    separate_quantize,
    shape,
    static_ints,
)

NORMS = frozenset({"LayerNormalization", "RMSNormalization"})


def _drop_leading_ones(dims: Sequence[Any]) -> tuple[Any, ...]:
    i = 0
    while i < len(dims) and dims[i] == 1:
        i += 1
    return tuple(dims[i:])


def _axis(node: Node) -> int | None:
    s = shape(node, 0)
    return None if s is None else norm_axis(node.attrs["axis"], len(s))


def _params(norm: Node) -> tuple[int, float, bool]:
    """(axis, epsilon, whether RMS) of a norm the tactics took (its axis is known)."""
    axis = _axis(norm)
    assert axis is not None
    return axis, float(norm.attrs["epsilon"]), norm.op == "RMSNormalization"


def _full_shape(node: Node, i: int, axis: int) -> bool:
    """Input i holds one value per normalized element: its shape is X's normalized shape (static), give or take
    leading 1s. (Other broadcasts, e.g. one value for every row, are left to other tactics.)"""
    x, s = shape(node, 0), shape(node, i)
    if x is None or s is None or not static_ints(s) or len(s) > len(x):
        return False
    normalized = x[axis:]
    return static_ints(normalized) and _drop_leading_ones(s) == _drop_leading_ones(normalized)


def _supported(node: Node, inputs: list[int]) -> bool:
    axis = _axis(node)
    if axis is None or node.attrs["stash_type"] is not DType.FLOAT32 or not floats(node, inputs):
        return False
    return all(_full_shape(node, i, axis) for i in inputs[1:] if present(node, i))


class TritonLayerNorm(TritonTactic):
    """Takes LayerNormalization with stash_type float32, float32/float16/bfloat16 tensors, a static normalized
    shape X.shape[axis:], and Scale (and B, if given) of exactly that shape (leading 1s allowed). Mean and
    InvStdDev are produced when the node asks for them (float32, X's leading dims then 1s)."""

    name = "triton.layernorm"
    ops = frozenset({"LayerNormalization"})

    def supports(self, node: Node) -> bool:
        return _supported(node, [0, 1, 2])

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        return _kernel(node, config, rms=False)


class TritonRMSNorm(TritonTactic):
    """Takes RMSNormalization under the same rules as `triton.layernorm` (Y in scale's dtype, as the op says)."""

    name = "triton.rmsnorm"
    ops = frozenset({"RMSNormalization"})

    def supports(self, node: Node) -> bool:
        return _supported(node, [0, 1])

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        return _kernel(node, config, rms=True)


def _kernel(node: Node, config: dict[str, Any], rms: bool) -> Kernel:
    from kiln.kernels.norm import triton_kernels as tk

    axis, eps, _ = _params(node)
    stats = len(node.outputs) > 1
    fallback = reference(node)

    def run(xs: list[Any]) -> list[Any]:
        x, w = xs[0], xs[1]
        b = xs[2] if len(xs) > 2 else None
        n = math.prod(x.shape[axis:])
        if x.numel() == 0 or w.numel() != n or (b is not None and b.numel() != n):
            return fallback(xs)
        y, mean, rstd, _ = tk.layernorm(x, w, b, n, eps, rms, stats, config)
        assert y is not None
        if mean is None or rstd is None:
            return [y]
        dims = (*x.shape[:axis], *([1] * (x.dim() - axis)))
        return [y, mean.reshape(dims), rstd.reshape(dims)]

    return run


# --- a norm of a residual sum ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidualNorm:
    """A "residual_norm" Fused node (`kiln.passes.residual_norm`) in the kernel's terms: the norm, the node input
    index of the Add's two operands, of the scale and of B (None: absent), and whether the node outputs the sum."""

    norm: Node
    a_at: int
    r_at: int
    w_at: int
    b_at: int | None
    keep_sum: bool


def residual_norm_view(node: Node) -> ResidualNorm | None:
    """The view of a "residual_norm" node that the Triton norm kernels take (the norm under `triton.layernorm`'s
    rules; the Add of two node inputs of the sum's type: no broadcast, no cast), or None."""
    if node.op != "Fused" or node.attrs.get("kind") != "residual_norm":
        return None
    body = node.attrs["body"]
    if len(body.nodes) != 2 or body.nodes[0].op != "Add" or body.nodes[1].op not in NORMS:
        return None
    add, norm = body.nodes
    s, y = add.outputs[0], norm.outputs[0]
    at = {v: i for i, v in enumerate(body.inputs)}
    if norm.inputs[0] is not s or len(add.inputs) != 2 or any(v not in at or v.type != s.type for v in add.inputs):
        return None
    if any(v is not None and v not in at for v in norm.inputs[1:]) or body.outputs not in ([y], [s, y]):
        return None
    if not _supported(norm, [0, 1, 2] if norm.op == "LayerNormalization" else [0, 1]):
        return None
    b = norm.inputs[2] if norm.op == "LayerNormalization" and len(norm.inputs) > 2 else None
    return ResidualNorm(norm, at[add.inputs[0]], at[add.inputs[1]], at[norm.inputs[1]],
                        None if b is None else at[b], len(body.outputs) == 2)


class TritonResidualNorm(TritonTactic):
    """A "residual_norm" node as one norm kernel that loads both addends and normalizes their sum (rounded to its
    type first, as the Add rounds it), writing the sum too when the node outputs it - under the rules of
    `triton.layernorm`. Rows longer than the config's `max_row` add with torch first."""

    name = "triton.residual_norm"
    ops = frozenset({"Fused"})

    def supports(self, node: Node) -> bool:
        return residual_norm_view(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        from kiln.kernels.norm import triton_kernels as tk

        view = residual_norm_view(node)
        assert view is not None
        axis, eps, rms = _params(view.norm)
        fallback = reference(node)

        def run(xs: list[Any]) -> list[Any]:
            a, r, w = xs[view.a_at], xs[view.r_at], xs[view.w_at]
            b = None if view.b_at is None else xs[view.b_at]
            n = math.prod(a.shape[axis:])
            if a.numel() == 0 or a.shape != r.shape or a.dtype != r.dtype or w.numel() != n or \
                    (b is not None and b.numel() != n):
                return fallback(xs)
            s = torch.empty(a.shape, dtype=a.dtype, device=a.device) if view.keep_sum else None
            y, _, _, _ = tk.layernorm(a, w, b, n, eps, rms, False, config, residual=r, sum_out=s)
            assert y is not None
            return [y] if s is None else [s, y]

        return run


# --- a norm that quantizes its result ----------------------------------------------------------------------------


def norm_quantize_view(node: Node) -> QuantizedOutput | None:
    """The view of a "quantizing" Fused node (`kiln.precision.quantize.fuse_output_quantize`) whose norm the Triton
    norm kernels take, or None."""
    view = quantizing_view(node, ("LayerNormalization", "RMSNormalization"))
    if view is None or not _supported(view.op, [0, 1, 2] if view.op.op == "LayerNormalization" else [0, 1]):
        return None
    return view


class TritonNormQuantize(TritonTactic):
    """A "quantizing" Fused node: LayerNormalization / RMSNormalization and the per-tensor QuantizeLinear of its result
    (int8, uint8 or float8 E4M3) in one kernel that writes the 8-bit values (and the float result when the node
    outputs it) - under the rules of `triton.layernorm`. The space adds `quantize`: "fused" (one kernel) or
    "separate" (the norm kernel, then the QuantizeLinear's own best kernel: what the graph ran before the fusion,
    kept so that the tuner always has it)."""

    name = "triton.norm_quantize"
    ops = frozenset({"Fused"})
    # why: the norm space's first per_thread / max_row (the fastest at BERT/LLaMA rows) and its tiles, times the
    # two ways: 6 configurations, few enough that the default level times them all (separate included)
    space = {"tile": SPACE["tile"], "per_thread": SPACE["per_thread"][:1], "max_row": SPACE["max_row"][:1],
             "quantize": ["fused", "separate"]}

    def supports(self, node: Node) -> bool:
        return norm_quantize_view(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        from kiln.kernels.norm import triton_kernels as tk

        view = norm_quantize_view(node)
        assert view is not None
        norm = view.op
        axis, eps, rms = _params(norm)
        x_at, w_at = view.at[norm.inputs[0]], view.at[norm.inputs[1]]  # type: ignore[index]
        bias = norm.inputs[2] if len(norm.inputs) > 2 else None
        b_at = None if bias is None else view.at[bias]
        quant = tk.Quantize.of(view)
        separate = separate_quantize(view, device) if config.get("quantize") == "separate" else None
        fallback = reference(node)

        def run(xs: list[Any]) -> list[Any]:
            x, w = xs[x_at], xs[w_at]
            b = None if b_at is None else xs[b_at]
            n = math.prod(x.shape[axis:])
            if x.numel() == 0 or w.numel() != n or (b is not None and b.numel() != n):
                return fallback(xs)
            if separate is not None:
                y, _, _, _ = tk.layernorm(x, w, b, n, eps, rms, False, config)
                assert y is not None
                yq = separate([y])[0]
            else:
                y, _, _, yq = tk.layernorm(x, w, b, n, eps, rms, False, config, quant)
            return [y, yq] if view.keep_y else [yq]

        return run
