"""Timing one callable on a device: warm-up, then the median of repeated runs.

On a GPU the callable is captured in a CUDA graph and the graph's replays are timed with CUDA events, with L2
flushed before each: what is measured is the kernels' own time, as the engine will run them (captured), not
Python's launch overhead, and no run finds its inputs still in cache from the previous one. Callables that
cannot be captured are timed by launching them directly.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

L2_FLUSH_BYTES = 256 << 20  # above every current GPU's L2 (H100: 50 MB)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, runs: int = 15,
                max_seconds: float = 0.25) -> float:
    """Median time of fn() in seconds. Stops early once `max_seconds` is spent."""
    return timed(fn, device, warmup=warmup, runs=runs, max_seconds=max_seconds)[0]


def timed(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, runs: int = 15,
          max_seconds: float = 0.25) -> tuple[float, bool]:
    """(median seconds, whether fn could be captured in a CUDA graph; always True off the GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        t = _graph_time(fn, device, runs, max_seconds)
        if t is not None:
            return t, True
    return _direct_time(fn, device, runs, max_seconds), device.type != "cuda"


def _direct_time(fn: Callable[[], Any], device: torch.device, runs: int, max_seconds: float) -> float:
    times: list[float] = []
    spent = 0.0
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        times.append(t)
        spent += t
        if spent > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)


_FLUSH: dict[torch.device, torch.Tensor] = {}


def _graph_time(fn: Callable[[], Any], device: torch.device, runs: int, max_seconds: float) -> float | None:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a host-only callable makes an empty graph: it still times fine
            with torch.cuda.graph(graph, stream=stream):
                fn()
    except Exception:  # not capturable: the caller times direct launches
        torch.cuda.synchronize(device)
        return None
    flush = _FLUSH.get(device)
    if flush is None:
        flush = _FLUSH[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    times: list[float] = []
    spent = 0.0
    for _ in range(runs):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        t = start.elapsed_time(end) / 1e3
        times.append(t)
        spent += t
        if spent > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)
