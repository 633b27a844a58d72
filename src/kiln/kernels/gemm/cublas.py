"""`cuda.linear`: MatMul / Gemm by a constant weight, alone or anchoring an epilogue, through cuBLAS (torch).

The weight is laid out once at build time. The leading axes of A fold into rows, so [batch, seq, K] @ [K, N] is
one GEMM. A bias step (Add of a constant [N]) goes into `addmm`'s C; a Relu right after it into cuBLASLt's epilogue
(`_addmm_activation`); everything after that runs as one pointwise kernel in place
(`kernels/epilogue.py`). Configs: the weight as [K, N] or as [N, K] (cuBLAS picks different kernels for the two
transpositions), and whether the activation goes into cuBLASLt or the pointwise kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.cpu.common import prepared
from kiln.kernels.epilogue import Anchored, tail
from kiln.kernels.registry import register

ANCHORS = frozenset({"MatMul", "Gemm"})


def _form(a: Anchored) -> tuple[bool, float, int | None] | None:
    """(B transposed, alpha, index of C in the node's inputs) for a supported anchor, else None."""
    if a.anchor.op == "MatMul":
        return False, 1.0, None
    at = a.anchor.attrs
    if at["transA"] or (a.input(2) is not None and at["beta"] != 1.0):
        return None
    c = a.arg[2] if len(a.arg) > 2 else None
    b, cv = a.constant(1), a.constant(2)
    if b is None or b.dim() != 2:
        return None
    n = b.shape[0] if at["transB"] else b.shape[1]
    if c is not None and (cv is None or cv.numel() not in (1, n) or (cv.dim() == 2 and cv.shape[0] != 1)):
        return None  # only a C that is the same for every row is a bias
    return bool(at["transB"]), float(at["alpha"]), c


def _bias_step(a: Anchored, n: int) -> tuple[int, int | None]:
    """(steps absorbed, node input index of the bias vector) for an Add(acc, constant [N]) first step."""
    if not a.steps or a.steps[0].op != "Add" or a.body is None:
        return 0, None
    _, v, data = a.step_operand(0)
    if v is None or data is None or data.numel() != n or data.dim() > 2 or v not in a.body.inputs:
        return 0, None
    return 1, a.body.inputs.index(v)


def _activation(a: Anchored, k: int) -> str | None:
    if k >= len(a.steps):
        return None
    # Relu only: cuBLASLt's GELU epilogue is the tanh form on GPUs but torch's CPU fallback computes erf, so
    # which GELU it is depends on the device; the pointwise kernel computes the one the model asks for.
    return "relu" if a.steps[k].op == "Relu" else None


class CublasLinear(Tactic):
    name = "cuda.linear"
    ops = frozenset({"MatMul", "Gemm", "Fused"})
    devices = frozenset({"cuda"})
    space = {"weight": ["kn", "nk"], "lt_epilogue": [True, False]}
    priority = 40

    def applicable(self, node: Node, device: torch.device) -> bool:
        a = Anchored.of(node, ANCHORS)
        if a is None or device.type not in self.devices or not a.dtypes_ok() or _form(a) is None:
            return False
        b, x = a.constant(1), a.input(0)
        return b is not None and b.dim() == 2 and x is not None and (x.rank or 0) >= 1

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        a = Anchored.of(node, ANCHORS)
        assert a is not None
        trans_b, alpha, c_at = _form(a)  # type: ignore[misc]
        b_at = a.arg[1]
        assert b_at is not None
        b = a.constant(1)
        assert b is not None
        n = b.shape[0] if trans_b else b.shape[1]
        nk = config.get("weight", "kn") == "nk"

        def layout(w: torch.Tensor) -> torch.Tensor:
            kn = (w.t() if trans_b else w) * alpha if alpha != 1 else (w.t() if trans_b else w)
            return kn.t().contiguous() if nk else kn.contiguous()

        weight = prepared(node, b_at, ("cuda.linear", nk, trans_b, alpha), layout)
        absorbed, bias_at = _bias_step(a, n) if c_at is None else (0, c_at)
        act = _activation(a, absorbed) if config.get("lt_epilogue", True) and bias_at is not None else None
        if act is not None:
            absorbed += 1
        rest = tail(a, absorbed)
        x_at = a.arg[0]
        assert x_at is not None

        def run(xs: list[Any]) -> list[Any]:
            x = xs[x_at]
            w = weight(xs[b_at])
            mat = w.t() if nk else w
            x2 = x.reshape(-1, x.shape[-1])
            if bias_at is None:
                y = torch.mm(x2, mat)
            else:
                bias = xs[bias_at].reshape(-1)
                if act is not None:
                    y = torch._addmm_activation(bias, x2, mat)
                else:
                    y = torch.addmm(bias, x2, mat)
            y = y.view(*x.shape[:-1], n)
            return [rest(y, xs)]

        return run


register(CublasLinear())
