"""CPU tactics for MatMul and Gemm.

- `cpu.onednn_linear`: oneDNN's inner product on a weight reordered once into oneDNN's blocked layout (alpha
  folded in), bias fused, A's leading axes folded into rows. Needs a 2-D B.
- `cpu.gemm_addmm`: Gemm as one BLAS `addmm` (alpha, beta and C fused) instead of matmul, scale and add.
- `cpu.matmul_linear`: MatMul by a constant 2-D B through `F.linear` on a pre-transposed contiguous copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner
from kiln.kernels.cpu.common import (
    F32,
    F32_F64,
    CpuTactic,
    constant,
    dtypes_in,
    empty,
    mkldnn_ops,
    prepared,
    present,
    rank,
    reference,
    static_shape,
)
from kiln.kernels.registry import register


@dataclass(frozen=True)
class GemmForm:
    """A MatMul or Gemm node as Y = alpha * A' @ B' + beta * C."""

    trans_a: bool
    trans_b: bool
    alpha: float
    beta: float
    has_c: bool
    """C is given and read (beta != 0)."""

    @staticmethod
    def of(node: Node) -> GemmForm:
        if node.op == "MatMul":
            return GemmForm(False, False, 1.0, 0.0, False)
        a = node.attrs
        has_c = present(node, 2) and a["beta"] != 0
        return GemmForm(bool(a["transA"]), bool(a["transB"]), float(a["alpha"]), float(a["beta"]), has_c)

    def weight_nk(self, b: torch.Tensor) -> torch.Tensor:
        """B as [N, K] with alpha folded in (the inner-product weight layout)."""
        w = b if self.trans_b else b.t()
        return w * self.alpha if self.alpha != 1 else w


def _row_bias(node: Node, form: GemmForm) -> bool:
    """C (static shape) is the same for every row of Y: [], [1], [N], [1, N] or [1, 1]."""
    shape = static_shape(node, 2) if form.has_c else None
    return shape is not None and (len(shape) <= 1 or shape[0] == 1)


def _bias_vector(c: torch.Tensor, beta: float, n: int) -> torch.Tensor:
    v = c.reshape(-1)
    v = v * beta if beta != 1 else v
    return (v.expand(n) if v.numel() == 1 else v).contiguous()


def _rows_hint(node: Node) -> int | None:
    """The number of rows of A' at the build's static shape, to pick the packed layout (None: unknown)."""
    shape = static_shape(node, 0)
    if shape is None or len(shape) < 2:
        return None if shape is None else 1
    if node.op == "Gemm" and node.attrs["transA"]:
        return shape[1]
    return math.prod(shape[:-1])


class OneDnnLinear(CpuTactic):
    name = "cpu.onednn_linear"
    ops = frozenset({"MatMul", "Gemm"})
    priority = 100

    def supports(self, node: Node) -> bool:
        if not mkldnn_ops("_linear_pointwise", "_reorder_linear_weight") or not dtypes_in(node, F32):
            return False
        return rank(node, 1) == 2 and (rank(node, 0) or 0) >= 1

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        form = GemmForm.of(node)
        hint = _rows_hint(node)
        weight: Callable[[torch.Tensor], Any] = form.weight_nk
        if constant(node, 1) is not None:
            weight = prepared(node, 1, (self.name, form, hint), lambda b: torch.ops.mkldnn._reorder_linear_weight(
                form.weight_nk(b).contiguous(), hint))
        bias = _bias_fn(node, form)
        add_c = form.has_c and not _row_bias(node, form)
        fallback = reference(node)
        linear = torch.ops.mkldnn._linear_pointwise

        def run(xs: list[Any]) -> list[Any]:
            if empty(xs):
                return fallback(xs)
            a = xs[0].t() if form.trans_a else xs[0]
            y = linear(a, weight(xs[1]), bias(xs), "none", [], "")
            if add_c:
                y.add_(xs[2], alpha=form.beta)  # y is this kernel's own fresh tensor
            return [y]

        return run


def _bias_fn(node: Node, form: GemmForm) -> Callable[[list[Any]], torch.Tensor | None]:
    """The fused bias vector of a call, or None (no C, or a C that varies along the rows)."""
    if not _row_bias(node, form):
        return lambda xs: None
    b_shape = static_shape(node, 1)
    if b_shape is not None and constant(node, 2) is not None:
        n = b_shape[0] if form.trans_b else b_shape[1]
        vec = prepared(node, 2, ("bias", form.beta, n), lambda c: _bias_vector(c, form.beta, n))
        return lambda xs: vec(xs[2])
    return lambda xs: _bias_vector(xs[2], form.beta, xs[1].shape[0 if form.trans_b else 1])


class GemmAddmm(CpuTactic):
    name = "cpu.gemm_addmm"
    ops = frozenset({"Gemm"})
    priority = 900

    def supports(self, node: Node) -> bool:
        return dtypes_in(node, F32_F64)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        form = GemmForm.of(node)

        def run(xs: list[Any]) -> list[Any]:
            a = xs[0].t() if form.trans_a else xs[0]
            b = xs[1].t() if form.trans_b else xs[1]
            if form.has_c:
                return [torch.addmm(xs[2], a, b, beta=form.beta, alpha=form.alpha)]
            y = torch.mm(a, b)
            return [y.mul_(form.alpha) if form.alpha != 1 else y]

        return run


class MatMulLinear(CpuTactic):
    name = "cpu.matmul_linear"
    ops = frozenset({"MatMul"})
    priority = 990

    def supports(self, node: Node) -> bool:
        return dtypes_in(node, F32_F64) and rank(node, 1) == 2 and constant(node, 1) is not None \
            and (rank(node, 0) or 0) >= 1

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        weight = prepared(node, 1, "transposed", lambda b: b.t().contiguous())
        return lambda xs: [F.linear(xs[0], weight(xs[1]))]


register(OneDnnLinear())
register(GemmAddmm())
register(MatMulLinear())
