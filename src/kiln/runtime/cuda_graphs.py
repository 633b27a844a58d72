"""CUDA graphs: capture a function of device tensors once per key (an input shape), replay it after.

A key is captured on its `capture_after`-th run (default 2); the runs before run eagerly. A capture costs a
warm-up run, the capture and a replay, so a shape seen once - every decode step of a growing key/value cache,
a one-off query - would pay three times for nothing; a shape that comes back is captured the second time and
replayed from the third.

Reusable beyond ONNX plans (the LLM runner will capture its decode steps with it). A captured function must only
touch device memory: anything that reads device data on the host (`.item()`, a data-dependent shape) cannot be
captured - CUDA refuses it, the capture fails, and that key runs eagerly from then on (`eager_keys` says why).
Work done on the host during capture (shape arithmetic on CPU tensors) is frozen into the graph, which is why
the key must hold every input shape.

Replays reuse the captured input buffers and memory: the caller copies its inputs in, replays, and must copy the
outputs out before the next replay. One graph memory pool is shared by the graphs of one `GraphCache`, so keep a
cache per execution context and never replay two of its graphs at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kiln.utils.log import logger

Fn = Callable[[dict[str, torch.Tensor]], dict[str, Any]]


@dataclass
class Captured:
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, Any]
    graph: torch.cuda.CUDAGraph


def copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for all i, skipping a tensor copied onto itself (a caller that wrote into the graph's
    own input buffer), in as few launches as torch's foreach copy makes (one per device and dtype where the shapes
    allow: at batch 1 a copy's launch costs more than its bytes)."""
    pairs = [(d, s) for d, s in zip(dst, src) if not (d.data_ptr() == s.data_ptr() and d.stride() == s.stride())]
    if len(pairs) > 1 and all(d.device == s.device and d.dtype == s.dtype for d, s in pairs):
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
        return
    for d, s in pairs:
        d.copy_(s)


MAX_SEEN = 256
"""How many not yet captured keys a cache remembers (their run counts; the oldest forgotten first)."""


class GraphCache:
    """At most `max_graphs` captured graphs, least recently used dropped first; a key is captured on its
    `capture_after`-th run (1: on first use)."""

    def __init__(self, device: torch.device, max_graphs: int = 8, capture_after: int = 2) -> None:
        if capture_after < 1:
            raise ValueError(f"capture_after must be >= 1, got {capture_after}")
        self.device = device
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.graphs: OrderedDict[Hashable, Captured] = OrderedDict()
        self.eager_keys: dict[Hashable, str] = {}
        self.seen: OrderedDict[Hashable, int] = OrderedDict()
        """Keys run (eagerly) fewer than `capture_after` times so far, with their counts."""
        self._pool: Any = None

    def run(self, key: Hashable, inputs: Mapping[str, torch.Tensor], fn: Fn) -> dict[str, Any] | None:
        """fn(inputs) through the graph captured for `key` (capturing it on its `capture_after`-th run); None
        when the caller is to run fn eagerly - before then, or when `key` cannot be captured. The returned
        tensors are the graph's own: copy them out."""
        if key in self.eager_keys:
            return None
        cap = self.graphs.get(key)
        if cap is None:
            runs = self.seen.pop(key, 0) + 1
            if runs < self.capture_after:
                self.seen[key] = runs
                while len(self.seen) > MAX_SEEN:
                    self.seen.popitem(last=False)
                return None
            cap = self._capture(key, inputs, fn)
            if cap is None:
                return None
        else:
            self.graphs.move_to_end(key)
        copy_all([cap.inputs[name] for name in inputs], list(inputs.values()))
        cap.graph.replay()
        return cap.outputs

    def _capture(self, key: Hashable, inputs: Mapping[str, torch.Tensor], fn: Fn) -> Captured | None:
        static = {k: x.detach().clone() for k, x in inputs.items()}
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):  # warm up off the capture: lazy compiles, library handles, allocations
                fn(static)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                outputs = fn(static)
        except Exception as e:  # not capturable (host reads of device data, ...): run this key eagerly
            torch.cuda.synchronize(self.device)
            self.eager_keys[key] = f"{type(e).__name__}: {e}"
            logger.warning("no CUDA graph for input shapes %s: each run launches every kernel from the host and "
                           "the GPU waits for it between kernels (slower). Why: %s", key, self.eager_keys[key])
            return None
        cap = Captured(static, outputs, graph)
        self.graphs[key] = cap
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return cap
