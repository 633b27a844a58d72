"""GEMM cases for `triton.gemm`: hand-built graphs (a MatMul/Gemm and its epilogue, fused by the real pass unless a
case needs a body the pass never makes), their feeds and the tiles each runs with. `run_case` compares the tactic's
output with the op table's reference (the Fused node's reference runs its body) and returns what differs.

Shared by the interpreter test (CPU, small shapes) and the GPU tier (`test_gpu.py`, `device="cuda"`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node, Value
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.kernels.gemm.triton_gemm import TILES
from kiln.passes.epilogue_fusion import epilogue_fusion

D = DType
F32, F16 = D.FLOAT32, D.FLOAT16
CUDA = torch.device("cuda")
TOL = {F32: 1e-4, F16: 1e-2, D.BFLOAT16: 5e-2}
"""Relative and absolute tolerance by the node's least precise dtype (the float16 reference rounds after every
step; on the GPU, float32 follows torch's TF32 setting on both sides)."""


@dataclass
class Case:
    node: Node
    feeds: dict[str, torch.Tensor]
    tiles: tuple[str, ...]


class Maker:
    """Builds one graph: inputs with random feeds, random constants (unit-scale outputs), seeded."""

    def __init__(self, seed: int = 0) -> None:
        self.g = Graph()
        self.feeds: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def rand(self, shape: tuple[int, ...], dt: DType, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=self.gen) * scale).to(dt.torch)

    def input(self, name: str, shape: tuple[int, ...], dt: DType) -> Value:
        self.feeds[name] = self.rand(shape, dt)
        return self.g.add_input(name, TensorType(dt, shape))

    def const(self, name: str, shape: tuple[int, ...], dt: DType, scale: float = 1.0) -> Value:
        return self.g.add_initializer(name, self.rand(shape, dt, scale))

    def weight(self, k: int, n: int, dt: DType, trans: bool = False) -> Value:
        return self.const("w", (n, k) if trans else (k, n), dt, k ** -0.5)

    def finish(self, y: Value, tiles: tuple[str, ...]) -> Case:
        self.g.outputs.append(y)
        epilogue_fusion(self.g)
        (node,) = [n for n in self.g.nodes if n.op in ("Fused", "MatMul", "Gemm")]
        return Case(node, self.feeds, tiles)


ALL = tuple(TILES)
WHOLE = tuple(name for name, t in TILES.items() if not (t.persistent or t.subtile > 1))
"""Every tile, and those with the epilogue on the whole tile and one program per tile (the sliced and persistent
ones have their own interpreter cases, `next_cases.py`)."""


def bias_gelu_residual(dt: DType, approximate: str, tiles: tuple[str, ...], lead: tuple[int, ...] = (2, 65),
                       k: int = 100, n: int = 96) -> Case:
    """[*lead, K] @ [K, N] + bias -> Gelu -> + residual: the transformer MLP's first half with a skip."""
    m = Maker(1)
    x = m.input("x", (*lead, k), dt)
    y = m.g.add("MatMul", [x, m.weight(k, n, dt)], name="mm")[0]
    y = m.g.add("Add", [y, m.const("b", (n,), dt)], name="bias")[0]
    y = m.g.add("Gelu", [y], {"approximate": approximate}, name="gelu")[0]
    y = m.g.add("Add", [y, m.input("res", (*lead, n), dt)], name="residual")[0]
    return m.finish(y, tiles)


def gemm_trans_b_alpha_bias(dt: DType, tiles: tuple[str, ...]) -> Case:
    """A bare Gemm: transB, alpha, a constant row bias C [N]; M=7, K=3, N=5."""
    m = Maker(2)
    x = m.input("x", (7, 3), dt)
    y = m.g.add("Gemm", [x, m.weight(3, 5, dt, trans=True), m.const("c", (5,), dt)],
                {"transB": 1, "alpha": 0.5}, name="fc")[0]
    return m.finish(y, tiles)


def gemm_trans_a_full_c_relu(dt: DType, tiles: tuple[str, ...]) -> Case:
    """Gemm with transA, alpha, beta and a full C [M, N] that is an activation, then Relu; M=7, K=100, N=96."""
    m = Maker(3)
    x = m.input("x", (100, 7), dt)
    y = m.g.add("Gemm", [x, m.weight(100, 96, dt), m.input("c", (7, 96), dt)],
                {"transA": 1, "alpha": 1.5, "beta": 2.0}, name="fc")[0]
    return m.finish(m.g.add("Relu", [y], name="relu")[0], tiles)


def gemm_column_c(dt: DType, beta: float, tiles: tuple[str, ...]) -> Case:
    """Gemm with a per-row C [M, 1]; with beta = 0 C is not read at all (here it holds NaN); M=130, K=100, N=96."""
    m = Maker(10)
    x = m.input("x", (130, 100), dt)
    c = m.input("c", (130, 1), dt)
    if beta == 0:
        m.feeds["c"] = torch.full((130, 1), float("nan"), dtype=dt.torch)
    y = m.g.add("Gemm", [x, m.weight(100, 96, dt), c], {"beta": beta}, name="fc")[0]
    return m.finish(y, tiles)


def vector_a(dt: DType, tiles: tuple[str, ...]) -> Case:
    """A 1-D A (one row, the axis dropped again): [3] @ [3, 5] -> Sigmoid -> [5]."""
    m = Maker(4)
    y = m.g.add("MatMul", [m.input("x", (3,), dt), m.weight(3, 5, dt)], name="mm")[0]
    return m.finish(m.g.add("Sigmoid", [y], name="sig")[0], tiles)


def bare(dt: DType, lead: tuple[int, ...], k: int, n: int, tiles: tuple[str, ...]) -> Case:
    m = Maker(5)
    return m.finish(m.g.add("MatMul", [m.input("x", (*lead, k), dt), m.weight(k, n, dt)], name="mm")[0], tiles)


def row_and_batch_operands(dt: DType, tiles: tuple[str, ...]) -> Case:
    """Operands of every broadcast: a per-row scale [2, 3, 1], a [1, 3, N] shared by the batch (not foldable into
    rows: copied), scalar Clip bounds; M=6, K=100, N=96."""
    m = Maker(6)
    y = m.g.add("MatMul", [m.input("x", (2, 3, 100), dt), m.weight(100, 96, dt)], name="mm")[0]
    y = m.g.add("Mul", [y, m.input("rows", (2, 3, 1), dt)], name="scale")[0]
    y = m.g.add("Add", [y, m.input("shared", (1, 3, 96), dt)], name="shift")[0]
    lo, hi = m.g.add_initializer("lo", torch.tensor(-0.5, dtype=dt.torch)), \
        m.g.add_initializer("hi", torch.tensor(1.0, dtype=dt.torch))
    return m.finish(m.g.add("Clip", [y, lo, hi], name="clip")[0], tiles)


def cast_out(tiles: tuple[str, ...]) -> Case:
    """float16 MatMul + bias -> Relu -> Cast to float32 (the store writes the node's output dtype); K=128 (no K
    masks), M=130, N=96."""
    m = Maker(7)
    y = m.g.add("MatMul", [m.input("x", (130, 128), F16), m.weight(128, 96, F16)], name="mm")[0]
    y = m.g.add("Add", [y, m.const("b", (96,), F16)], name="bias")[0]
    y = m.g.add("Relu", [y], name="relu")[0]
    return m.finish(m.g.add("Cast", [y], {"to": F32}, name="cast")[0], tiles)


def ragged_k3(dt: DType, tiles: tuple[str, ...]) -> Case:
    """M=130, K=3, N=5 -> Tanh."""
    m = Maker(8)
    y = m.g.add("MatMul", [m.input("x", (130, 3), dt), m.weight(3, 5, dt)], name="mm")[0]
    return m.finish(m.g.add("Tanh", [y], name="tanh")[0], tiles)


def local_constants(dt: DType, tiles: tuple[str, ...]) -> Case:
    """A Fused body holding its own constants (a scalar, baked into the source, and a vector [N], an operand of
    its own): MatMul -> Mul(0.125) -> Add(vector) -> Swish. Built by hand: the pass makes every constant an input."""
    m = Maker(9)
    x = m.input("x", (2, 7, 100), dt)
    w = m.weight(100, 96, dt)
    body = Graph("mm + scale + shift + swish", parent=m.g)
    xi, wi = body.add_input("x.in", x.type), body.add_input("w.in", w.type)
    y = body.add("MatMul", [xi, wi], name="mm")[0]
    y = body.add("Mul", [y, body.add_initializer("s", torch.tensor(0.125, dtype=dt.torch))], name="scale")[0]
    y = body.add("Add", [y, body.add_initializer("v", m.rand((96,), dt))], name="shift")[0]
    body.outputs = [body.add("Swish", [y], {"alpha": 1.0}, name="swish")[0]]
    node = Node("Fused", [x, w], [Value("y", body.outputs[0].type)], {"body": body, "kind": "epilogue"}, "fused")
    return Case(node, m.feeds, tiles)


CASES: dict[str, Callable[[], Case]] = {
    "bias-gelu-erf-residual-f32-every-tile": lambda: bias_gelu_residual(F32, "none", WHOLE),
    "bias-gelu-tanh-residual-f16": lambda: bias_gelu_residual(F16, "tanh", ("128x128x64-w4s4", "16x64x256-w4s3")),
    "bias-gelu-erf-residual-f16-m1": lambda: bias_gelu_residual(F16, "none", ("16x64x256-w4s3",), lead=(1,)),
    "bias-gelu-erf-residual-f16-tma": lambda: bias_gelu_residual(
        F16, "none", ("tma-128x256x64-w8s4", "tma-128x256x64-w8s3"), k=96),
    "gemm-transb-alpha-bias-f32": lambda: gemm_trans_b_alpha_bias(F32, ("64x64x64-w4s4", "16x64x256-w4s3")),
    "gemm-transb-alpha-bias-f16": lambda: gemm_trans_b_alpha_bias(F16, ("32x64x128-w4s4",)),
    "gemm-transa-full-c-relu-f32": lambda: gemm_trans_a_full_c_relu(F32, ("32x64x128-w4s4", "tma-128x256x64-w8s3")),
    "gemm-transa-full-c-relu-f16": lambda: gemm_trans_a_full_c_relu(F16, ("64x128x64-w4s4",)),
    "gemm-column-c-beta-f32": lambda: gemm_column_c(F32, 0.5, ("32x64x128-w4s4",)),
    "gemm-column-c-beta-f16": lambda: gemm_column_c(F16, -1.0, ("128x128x64-w4s4",)),
    "gemm-beta0-ignores-c-f32": lambda: gemm_column_c(F32, 0.0, ("64x128x64-w4s4",)),
    "vector-a-sigmoid-f32": lambda: vector_a(F32, ("16x64x256-w4s3", "128x256x64-w8s3")),
    "bare-m1-f16": lambda: bare(F16, (1, 1), 100, 96, ("16x64x256-w4s3", "64x64x64-w4s4")),
    "bare-m7-n5-k3-f32": lambda: bare(F32, (7,), 3, 5, ("128x128x64-w4s4",)),
    "bare-m130-f32": lambda: bare(F32, (130,), 100, 96, ("tma-128x256x64-w8s4",)),
    "row-and-batch-operands-f32": lambda: row_and_batch_operands(F32, ("64x64x64-w4s4",)),
    "row-and-batch-operands-f16": lambda: row_and_batch_operands(F16, ("32x64x128-w4s4",)),
    "cast-out-f16-to-f32": lambda: cast_out(("tma-128x256x64-w8s3", "64x128x64-w4s4")),
    "ragged-k3-tanh-f32": lambda: ragged_k3(F32, ("128x256x64-w8s3", "16x64x256-w4s3")),
    "local-constants-f32": lambda: local_constants(F32, ("64x64x64-w4s4",)),
    "local-constants-f16": lambda: local_constants(F16, ("128x128x64-w4s4",)),
}


def constants_to(node: Node, device: str) -> None:
    """Moves the node's constant inputs to `device`, as the engine holds them (prepared weights then stay valid)."""
    for v in node.inputs:
        if v is not None and isinstance(v.data, torch.Tensor):
            v.data = v.data.to(device)


def inputs(node: Node, feeds: dict[str, torch.Tensor], device: str = "cpu") -> list[Any]:
    return [None if v is None else (v.data if v.data is not None else feeds[v.name]).to(device) for v in node.inputs]


def tolerance(node: Node) -> float:
    return max(TOL[v.dtype] for v in [*node.inputs, *node.outputs] if v is not None)


def compare(got: Any, want: torch.Tensor, tol: float) -> str | None:
    """What differs between a kernel output and the reference (None: they agree)."""
    if not isinstance(got, torch.Tensor):
        return f"got {type(got).__name__}, expected a tensor"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    try:
        torch.testing.assert_close(got.cpu().double(), want.cpu().double(), rtol=tol, atol=tol)
    except AssertionError as e:
        return str(e)[:1500]
    return None


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    return run(CASES[name](), device)


def run(case: Case, device: str = "cpu", tol: float | None = None, tactic_name: str = "triton.gemm") \
        -> dict[str, str | None]:
    """{tile: what differs, or None} for every tile of the case, built for CUDA and run on `device` tensors."""
    tactic = registry.get(tactic_name)
    if not tactic.applicable(case.node, CUDA):
        return {"applicable": f"{tactic_name} refused the node"}
    args = inputs(case.node, case.feeds, device)
    want = OPS[case.node.op].ref(RefCtx(case.node), list(args))[0]
    out: dict[str, str | None] = {}
    for tile in case.tiles:
        got = tactic.build(case.node, {"tile": tile}, CUDA)(list(args))[0]
        out[tile] = compare(got, want, tolerance(case.node) if tol is None else tol)
    return out
