"""Op table entries: losses (NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss).

Both take class scores of shape [N, C, d1, ..., dk] and integer targets of shape [N, d1, ..., dk]. A target
equal to `ignore_index` contributes nothing (weight 0). With reduction 'mean' the sum of the weighted losses
is divided by the sum of the weights of the targets not ignored (the count of them when no weights are
given), as the ONNX function bodies compute.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Shape, TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register
from kiln.ir.ops.norm import softmax_steps
from kiln.ir.ops.reduce import check_dtype, float_compute

_ATTRS = {
    "ignore_index": Attr(AttrKind.INT, None, doc="target value that contributes no loss"),
    "reduction": Attr(AttrKind.STRING, "mean", choices=("none", "sum", "mean")),
}


def _loss_shape(ctx: InferCtx, scores: Shape | None, target: Shape | None) -> Shape | None:
    """The per-element loss shape ([N, d1, ..., dk]); checks scores against targets."""
    if scores is not None and len(scores) < 2:
        raise ctx.error(f"scores must be [N, C, ...], got shape {list(scores)}")
    if scores is None or target is None:
        return target if scores is None else (scores[0], *scores[2:])
    expect = (scores[0], *scores[2:])
    if len(target) != len(expect) or any(
        isinstance(t, int) and isinstance(e, int) and t != e for t, e in zip(target, expect)
    ):
        raise ctx.error(f"targets of shape {list(target)} do not fit scores of shape {list(scores)}")
    return tuple(t if isinstance(t, int) else e for t, e in zip(target, expect))


def _loss_infer(ctx: InferCtx) -> list[TensorType]:
    dt = check_dtype(ctx, 0, ints=False)
    if ctx.dtype(1) not in (DType.INT32, DType.INT64):
        raise ctx.error(f"targets must be int32 or int64, got {ctx.dtype(1)}")
    scores = ctx.shape(0)
    per_element = _loss_shape(ctx, scores, ctx.shape(1))
    if ctx.has(2):
        if ctx.dtype(2) is not dt:
            raise ctx.error(f"weights must have the scores' dtype {dt}, got {ctx.dtype(2)}")
        weights = ctx.shape(2)
        channels: sym.Dim | None = None if scores is None else scores[1]
        if weights is not None and (len(weights) != 1 or (
                isinstance(channels, int) and isinstance(weights[0], int) and weights[0] != channels)):
            raise ctx.error(f"weights must have shape [C], got {list(weights)}")
    out = per_element if ctx.attrs["reduction"] == "none" else ()
    return [TensorType(dt, out), TensorType(dt, scores)]


def nll_loss(log_prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
             ignore_index: int | None, reduction: str) -> torch.Tensor:
    """The NLL loss of `log_prob` (already in compute precision); see the module docstring."""
    tgt = target.to(torch.int64)
    keep = torch.ones_like(tgt, dtype=torch.bool) if ignore_index is None else tgt != ignore_index
    safe = torch.where(keep, tgt, torch.zeros_like(tgt))
    classes = log_prob.shape[1]
    bad = keep & ((safe < 0) | (safe >= classes))
    if bool(bad.any()):
        raise ValueError(f"target {int(safe[bad][0])} is outside the {classes} classes and not ignore_index")
    picked = -torch.gather(log_prob, 1, safe.unsqueeze(1)).squeeze(1)
    w = torch.ones_like(picked) if weight is None else float_compute(weight)[safe].to(picked.dtype)
    w = torch.where(keep, w, torch.zeros_like(w))
    loss = picked * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w.sum()


def _nll_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, target = xs[0], xs[1]
    weight = xs[2] if len(xs) > 2 else None
    loss = nll_loss(float_compute(x), target, weight, c.attrs["ignore_index"], c.attrs["reduction"])
    return [loss.to(x.dtype)]


def _sce_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, target = xs[0], xs[1]
    weight = xs[2] if len(xs) > 2 else None
    log_prob = softmax_steps(x, 1, log=True)
    loss = nll_loss(float_compute(log_prob), target, weight, c.attrs["ignore_index"], c.attrs["reduction"])
    return [loss.to(x.dtype), log_prob]


register(
    "NegativeLogLikelihoodLoss", inputs=["input", "target", "weight?"], outputs=["loss"], attrs=dict(_ATTRS),
    infer=_loss_infer, ref=_nll_ref,
    doc="loss[n, d] = -input[n, target[n, d], d] * weight[target[n, d]], reduced by `reduction`.",
)
register(
    "SoftmaxCrossEntropyLoss", inputs=["scores", "labels", "weights?"], outputs=["output", "log_prob?"],
    attrs=dict(_ATTRS), infer=_loss_infer, ref=_sce_ref,
    doc="NegativeLogLikelihoodLoss of log_softmax(scores) along axis 1; log_prob is that log_softmax.",
)
