"""Timing: CUDA events on the GPU, the host clock on the CPU; input sets rotated; median and percentiles.

On a GPU every timed iteration is bracketed by two CUDA events recorded on the current stream, with no host
synchronization between iterations: the events measure the stream's time from the start of one iteration to its
end, which includes any time the GPU waits for the host to launch work (a launch-bound mode pays for it) but not
time the host spends queueing ahead of a busy GPU. The host synchronizes once, after the last iteration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

Step = Callable[[int], Any]  # step(k): one inference on input set k
T = TypeVar("T")
MIN_ITERS = 10
MAX_ITERS = 100_000
ESTIMATE_ITERS = 5


@dataclass
class Stats:
    """Per-iteration times of one mode, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    iters: int
    samples_ms: list[float]


def summarize(samples_ms: list[float]) -> Stats:
    a = np.asarray(samples_ms, dtype=np.float64)
    p10, p50, p90 = (float(v) for v in np.percentile(a, [10, 50, 90]))
    return Stats(p50, p10, p90, float(a.mean()), float(a.min()), float(a.max()), len(samples_ms),
                 [round(float(v), 6) for v in a])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run fn once; its result and host wall time in seconds, the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def warm_up(step: Step, n_sets: int, iters: int, device: torch.device) -> None:
    for i in range(iters):
        step(i % n_sets)
    sync(device)


def choose_iters(step: Step, n_sets: int, device: torch.device, seconds: float) -> int:
    """How many iterations fill about `seconds`, estimated from a few timed ones."""
    _, t = timed(lambda: [step(i % n_sets) for i in range(ESTIMATE_ITERS)], device)
    per = max(t / ESTIMATE_ITERS, 1e-6)
    return int(min(max(seconds / per, MIN_ITERS), MAX_ITERS))


def measure(step: Step, n_sets: int, device: torch.device, iters: int) -> Stats:
    """Time `iters` iterations, rotating through the `n_sets` input sets."""
    samples = _cuda_samples(step, n_sets, iters) if device.type == "cuda" else _host_samples(step, n_sets, iters)
    return summarize(samples)


def _cuda_samples(step: Step, n_sets: int, iters: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        step(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _host_samples(step: Step, n_sets: int, iters: int) -> list[float]:
    samples = []
    for i in range(iters):
        t0 = time.perf_counter()
        step(i % n_sets)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples
