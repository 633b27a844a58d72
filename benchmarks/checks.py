"""Correctness numbers: one output against a reference, compared in float64."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# A mode whose outputs fall below this cosine similarity against eager (same precision) is marked FAILED.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.999}
MIN_COSINE_INT8 = 0.99
"""The kiln-int8 mode's bar against eager (INT8 post-training quantization loses more than a float type)."""


@dataclass
class OutputCheck:
    """One output against its reference: max |got - ref|, ||got - ref|| / ||ref||, cosine similarity and, for
    [batch, classes] outputs (a classifier's logits), the share of rows whose top-1 class is the reference's."""

    output: str
    max_abs: float
    rel_l2: float
    cosine: float
    top1: float | None = None


def compare(names: Sequence[str], got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> list[OutputCheck]:
    return [compare_one(n, g, r) for n, g, r in zip(names, got, ref)]


def compare_one(name: str, got: torch.Tensor, ref: torch.Tensor) -> OutputCheck:
    if tuple(got.shape) != tuple(ref.shape):
        raise ValueError(f"output '{name}': shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    g = got.detach().to("cpu", torch.float64).flatten()
    r = ref.detach().to("cpu", torch.float64).flatten()
    diff = g - r
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    ref_norm = float(r.norm())
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else (0.0 if max_abs == 0 else math.inf)
    top1 = None
    if got.dim() == 2 and got.shape[0] > 0 and got.shape[1] > 1:
        top1 = float((got.detach().cpu().argmax(-1) == ref.detach().cpu().argmax(-1)).double().mean())
    return OutputCheck(name, max_abs, rel, cosine(g, r), top1)


def cosine(g: torch.Tensor, r: torch.Tensor) -> float:
    """Cosine similarity; two all-zero vectors count as equal, NaN or Inf anywhere as 0 (a failure)."""
    if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(r).all())):
        return 0.0
    gn, rn = float(g.norm()), float(r.norm())
    if gn == 0 or rn == 0:
        return 1.0 if gn == rn else 0.0
    return float(torch.dot(g, r)) / (gn * rn)


def worst(checks: Sequence[OutputCheck]) -> OutputCheck | None:
    """The output with the lowest cosine."""
    return min(checks, key=lambda c: c.cosine) if checks else None


def passes(checks: Sequence[OutputCheck], precision: str, min_cosine: float | None = None) -> bool:
    limit = MIN_COSINE[precision] if min_cosine is None else min_cosine
    return all(c.cosine >= limit for c in checks)
