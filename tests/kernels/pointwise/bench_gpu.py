"""Times generated pointwise kernels against PyTorch eager and torch.compile on the same GPU (CUDA events after
warm-up, median of many runs, inputs rotated). Not a test; run from the repository root:

    PYTHONPATH=src:. python tests/kernels/pointwise/bench_gpu.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kiln.ir import DType, Graph
from kiln.kernels.pointwise import PointwiseKernel
from tests.kernels.pointwise.cases import graph

D = DType
CUDA = torch.device("cuda")


def _gpu_us(fn: Callable[[int], object], reps: int = 20, runs: int = 30) -> float:
    """GPU time of one call: `reps` calls captured in a CUDA graph (no launch overhead), median replay / reps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(times)


def _call_us(fn: Callable[[int], object], n: int = 300) -> float:
    """Wall time per call of back-to-back calls (launch overhead included)."""
    for i in range(10):
        fn(i)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def _sets(make: Callable[[], list[torch.Tensor]], n: int = 3) -> list[list[torch.Tensor]]:
    return [make() for _ in range(n)]


Bench = tuple[str, Graph, Callable[[], list[torch.Tensor]], Callable[..., torch.Tensor]]


def bias_gelu(m: int, n: int) -> Bench:
    g, (x, b) = graph((D.FLOAT16, (m, n)), (D.FLOAT16, (n,)))
    g.outputs = list(g.add("Gelu", [g.add("Add", [x, b])[0]], {"approximate": "tanh"}))
    return (f"bias+gelu(tanh) fp16 [{m},{n}]", g,
            lambda: [torch.randn(m, n, device=CUDA).half(), torch.randn(n, device=CUDA).half()],
            lambda x, b: F.gelu(x + b, approximate="tanh"))


def nchw(n: int, c: int, h: int, w: int) -> Bench:
    g, (x, s, b, r) = graph((D.FLOAT16, (n, c, h, w)), (D.FLOAT16, (1, c, 1, 1)), (D.FLOAT16, (1, c, 1, 1)),
                            (D.FLOAT16, (n, c, h, w)))
    g.outputs = [g.add("Relu", [g.add("Add", [g.add("Add", [g.add("Mul", [x, s])[0], b])[0], r])[0]])[0]]
    return (f"x*s+b+res,relu fp16 [{n},{c},{h},{w}]", g,
            lambda: [torch.randn(n, c, h, w, device=CUDA).half(), torch.randn(1, c, 1, 1, device=CUDA).half(),
                     torch.randn(1, c, 1, 1, device=CUDA).half(), torch.randn(n, c, h, w, device=CUDA).half()],
            lambda x, s, b, r: torch.relu(x * s + b + r))


def run(bench: Bench) -> list[str]:
    name, g, make, eager = bench
    sets = _sets(make)
    kernel = PointwiseKernel(g)
    outs = [kernel(s) for s in sets]
    moved = sum(t.numel() * t.element_size() for t in sets[0]) + sum(o.numel() * o.element_size() for o in outs[0])
    lines = [f"{name} ({moved / 1e6:.0f} MB moved)"]
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (512, 4)):
        k = PointwiseKernel(g, block=block, num_warps=warps)
        us = _gpu_us(lambda i, k=k: k(sets[i % 3], out=outs[i % 3]))
        lines.append(f"  kiln BLOCK={block} warps={warps}: {us:.1f} us GPU ({moved / us / 1e3:.0f} GB/s)")
    per_call = _call_us(lambda i: kernel(sets[i % 3], out=outs[i % 3]))
    lines.append(f"  kiln per call (launch included): {per_call:.1f} us")
    lines.append(f"  eager: {_gpu_us(lambda i: eager(*sets[i % 3])):.1f} us GPU, "
                 f"{_call_us(lambda i: eager(*sets[i % 3])):.1f} us per call")
    compiled = torch.compile(eager)
    lines.append(f"  torch.compile: {_gpu_us(lambda i: compiled(*sets[i % 3])):.1f} us GPU, "
                 f"{_call_us(lambda i: compiled(*sets[i % 3])):.1f} us per call")
    return lines


def overhead() -> str:
    """Per-call cost of a tiny kernel through PointwiseKernel and through Triton's own launch alone."""
    name, g, make, _ = bias_gelu(4, 256)
    xs = make()
    kernel = PointwiseKernel(g)
    (out,) = kernel(xs)
    wrapped = _call_us(lambda i: kernel(xs, out=[out]))
    _, launch, fn = list(kernel._plans.values())[-1]  # the plan of the calls with out=
    raw = _call_us(lambda i: fn[(1,)](*xs, out, launch.numel, *launch.args, BLOCK=1024, num_warps=4))
    return f"{name}: PointwiseKernel {wrapped:.1f} us per call, Triton launch alone {raw:.1f} us"


def main() -> None:
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(overhead(), flush=True)
    for bench in (bias_gelu(8192, 4096), bias_gelu(4096, 1027), nchw(32, 128, 56, 56)):
        print("\n".join(run(bench)), flush=True)


if __name__ == "__main__":
    main()
