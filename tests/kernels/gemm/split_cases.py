"""Cases for the split-K GEMM tiles (`triton.gemm_splitk`): K shares of every size - a ragged last K step, shares
fewer than the tile's split (no program without a step), one step each - and epilogues reading every operand kind
(bias, residual, Gemm's alpha / beta * C with A transposed, per-row and shared operands), in float16 and float32.
Shared by the interpreter test and the GPU tier."""

from __future__ import annotations

from collections.abc import Callable

from kiln.ir import DType
from kiln.kernels.gemm.triton_gemm import SPLIT_TILES
from tests.kernels.gemm import cases as f
from tests.kernels.gemm.cases import Case, Maker

F16, F32 = DType.FLOAT16, DType.FLOAT32
SPLIT = tuple(SPLIT_TILES)


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
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    return f.run(CASES[name](), device, tactic_name="triton.gemm_splitk")
