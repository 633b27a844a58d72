"""The accuracy gate: compare a quantized graph with the float one on held-out inputs and, with a target, keep
the layers most responsible for the loss in float until the target is met.

Metrics per output: cosine similarity (over each sample's flattened output), max abs error, and for 2-D
outputs top-1 agreement (argmax over the last axis, as classifiers use it). A target is "cosine>=X" or
"top1>=X", checked on the worst output. Sensitivity: each layer is quantized alone and scored; layers are then
returned to float worst-first, re-checking the whole graph, until the target holds.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kiln.ir.graph import Graph
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import KilnError

_TARGET = re.compile(r"^\s*(cosine|top1)\s*>=\s*([0-9]*\.?[0-9]+)\s*$")


class AccuracyError(KilnError):
    """An accuracy target that cannot be read or cannot be met."""


@dataclass(frozen=True)
class Target:
    metric: str
    value: float

    @staticmethod
    def parse(text: str) -> Target:
        m = _TARGET.match(text)
        if m is None:
            raise AccuracyError(f"accuracy target '{text}' is not 'cosine>=X' or 'top1>=X'",
                                hint="e.g. --accuracy-target cosine>=0.995 or top1>=0.99")
        return Target(m.group(1), float(m.group(2)))

    def met(self, metrics: Mapping[str, float]) -> bool:
        return metrics[self.metric] >= self.value


@dataclass
class AccuracyReport:
    metrics: dict[str, float] = field(default_factory=dict)
    """The worst output's cosine, top1 (when any output is 2-D) and max_abs_error."""
    kept_float: list[str] = field(default_factory=list)
    target: str | None = None
    met: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {"metrics": {k: round(v, 6) for k, v in self.metrics.items()}, "kept_float": list(self.kept_float),
                "target": self.target, "met": self.met}


def run_outputs(graph: Graph, samples: Sequence[Mapping[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    interp = Interpreter(graph, check=False, device=device)
    return [interp.run(dict(s)) for s in samples]


def compare(ref: Sequence[Mapping[str, Any]], got: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    cos, top1, err = 1.0, 1.0, 0.0
    has_top1 = False
    for r, g in zip(ref, got):
        for name, a in r.items():
            a64 = np.asarray(a, dtype=np.float64)
            b64 = np.asarray(g[name], dtype=np.float64)
            if a64.size == 0:
                continue
            flat_a, flat_b = a64.reshape(a64.shape[0], -1) if a64.ndim > 1 else a64[None], \
                b64.reshape(b64.shape[0], -1) if b64.ndim > 1 else b64[None]
            num = (flat_a * flat_b).sum(1)
            den = np.linalg.norm(flat_a, axis=1) * np.linalg.norm(flat_b, axis=1)
            c = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
            cos = min(cos, float(c.min()))
            err = max(err, float(np.abs(a64 - b64).max()))
            if a64.ndim == 2:
                has_top1 = True
                top1 = min(top1, float((a64.argmax(1) == b64.argmax(1)).mean()))
    out = {"cosine": cos, "max_abs_error": err}
    if has_top1:
        out["top1"] = top1
    return out


Quantizer = Callable[[Graph, set[str]], list[str]]
"""Quantizes a graph in place leaving the named layers float; returns the layers it quantized."""


def gate(graph: Graph, quantize: Quantizer, samples: Sequence[Mapping[str, Any]], device: torch.device,
         target: Target | None) -> tuple[Graph, AccuracyReport]:
    """The quantized graph to build (a copy of `graph`) and how it compares with `graph` on `samples`."""
    ref = run_outputs(graph, samples, device)

    def trial(skip: set[str]) -> tuple[Graph, list[str], dict[str, float]]:
        g = copy.deepcopy(graph)
        layers = quantize(g, skip)
        return g, layers, compare(ref, run_outputs(g, samples, device))

    q, layers, metrics = trial(set())
    report = AccuracyReport(metrics, [], None if target is None else f"{target.metric}>={target.value}")
    if target is None:
        return q, report
    if target.metric not in metrics:
        raise AccuracyError(f"target {report.target}: the model has no 2-D (classifier) output to compare top-1 on",
                            hint="use a cosine target")
    if target.met(metrics):
        report.met = True
        return q, report
    scores = []
    for name in layers:  # each layer alone: how much does quantizing it cost?
        others = set(layers) - {name}
        scores.append((trial(others)[2][target.metric], name))
    skip: set[str] = set()
    for _, name in sorted(scores):
        skip.add(name)
        q, _, metrics = trial(skip)
        if target.met(metrics):
            break
    report.metrics, report.kept_float, report.met = metrics, sorted(skip), target.met(metrics)
    return q, report
