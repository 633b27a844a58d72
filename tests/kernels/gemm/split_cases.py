"""Cases for the split-K GEMM tiles (`triton.gemm_splitk`): K shares of every size - a ragged last K step, shares
fewer than the tile's split (no program without a step), one step each - and epilogues reading every operand kind
(bias, residual, Gemm's alpha / beta * C with A transposed, per-row and shared operands), in float16 and float32.
Shared by the interpreter test and the GPU tier."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kiln.ir import DType
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels.gemm.triton_gemm import SPLIT_TILES, GemmKernel
from kiln.kernels.gemm.triton_gemm import spec as spec_of
from tests.kernels.gemm import cases as f
from tests.kernels.gemm.cases import Case, Maker

F16, F32 = DType.FLOAT16, DType.FLOAT32
SPLIT = tuple(SPLIT_TILES)
LAST = tuple(name for name, t in SPLIT_TILES.items() if t.last_sums)


def trans_a_full_c(dt: DType) -> Case:
    """Gemm with transA (A read through a transposed view), alpha, beta and a full C [M, N]; M=7, K=300, N=96."""
    m = Maker(11)
    x = m.input("x", (300, 7), dt)
    y = m.g.add("Gemm", [x, m.weight(300, 96, dt), m.input("c", (7, 96), dt)],
                {"transA": 1, "alpha": 1.5, "beta": 2.0}, name="fc")[0]
    return m.finish(m.g.add("Relu", [y], name="relu")[0], SPLIT)


def row_and_batch(dt: DType) -> Case:
    """A per-row scale, an operand shared by the batch, scalar Clip bounds (as `cases.row_and_batch_operands`)
    after a K of 320; M=6, N=96."""
    m = Maker(12)
    y = m.g.add("MatMul", [m.input("x", (2, 3, 320), dt), m.weight(320, 96, dt)], name="mm")[0]
    y = m.g.add("Mul", [y, m.input("rows", (2, 3, 1), dt)], name="scale")[0]
    y = m.g.add("Add", [y, m.input("shared", (1, 3, 96), dt)], name="shift")[0]
    return m.finish(m.g.add("Sigmoid", [y], name="sig")[0], SPLIT)


CASES: dict[str, Callable[[], Case]] = {
    # K=300: 5 steps of 64 (the last ragged) shared 2/3/5 ways, 3 of 128, 2 of 256; M=130 (3 row tiles of 64)
    "bias-gelu-residual-f16-ragged-k": lambda: f.bias_gelu_residual(F16, "none", SPLIT, lead=(2, 65), k=300, n=96),
    "bare-f32-ragged-k": lambda: f.bare(F32, (70,), 260, 100, SPLIT),
    "gemm-transa-alpha-beta-c-relu-f32": lambda: trans_a_full_c(F32),
    "row-and-batch-operands-f16": lambda: row_and_batch(F16),
    # K=1024 in whole steps: 16 / 8 / 4 steps, shares of 2 to 8 steps
    "bias-gelu-residual-f16-even-k": lambda: f.bias_gelu_residual(F16, "tanh", SPLIT, lead=(1, 40), k=1024, n=136),
    "last-sums-twice": lambda: f.bias_gelu_residual(F16, "none", LAST, lead=(2, 65), k=300, n=96),
}


def _twice(device: str) -> dict[str, str | None]:
    """Each one-kernel tile run twice on new inputs by the same kernel: both results right, and the per-tile
    arrival counters back at zero after each launch (what the next launch, or a graph replay, starts from)."""
    case = f.bias_gelu_residual(F16, "none", (), lead=(2, 65), k=300, n=96)
    node = case.node
    out: dict[str, str | None] = {}
    for tile in (t for t, spec in SPLIT_TILES.items() if spec.last_sums):
        kernel = GemmKernel(node, spec_of(node), SPLIT_TILES[tile], f.CUDA)  # type: ignore[arg-type]
        problems = []
        for seed in (0, 1):
            feeds = {k: v if seed == 0 else torch.randn_like(v.float()).to(v.dtype) for k, v in case.feeds.items()}
            args = f.inputs(node, feeds, device)
            want = OPS[node.op].ref(RefCtx(node), list(args))[0]
            problems.append(f.compare(kernel(list(args))[0], want, f.tolerance(node)))
            left = [int(c.count_nonzero()) for c in kernel._counters.values()]
            if not left or any(left):
                problems.append(f"counters after launch {seed}: {left or 'none made'}")
        out[tile] = "; ".join(p for p in problems if p) or None
    return out


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    if name == "last-sums-twice":
        return _twice(device)
    return f.run(CASES[name](), device, tactic_name="triton.gemm_splitk")
