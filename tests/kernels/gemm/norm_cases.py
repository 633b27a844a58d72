"""Cases for the "normalized" node's tactics (`triton.norm_gemm`, `split.norm_gemm`): a LayerNorm/RMSNorm and the
MatMul/Gemm reading it, fused by the real passes (epilogue fusion, then `fuse_norm_gemm`), run against the op
table's reference (the body, node by node). Shared by the interpreter test (CPU) and the GPU tier."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kiln.ir import DType
from kiln.ir.graph import Value
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.kernels.gemm.norm_gemm import NORM_TILES, NORM_TMA_TILES
from kiln.passes.epilogue_fusion import epilogue_fusion
from kiln.passes.fuse_norm_gemm import fuse_norm_gemm
from tests.kernels.gemm.cases import CUDA, F16, F32, Case, Maker, compare, inputs, tolerance

SPLIT = ("cuda.linear/kn", "cuda.linear/nk/no-lt", "triton.gemm/16x64x256-w4s3", "triton.gemm/64x64x64-w4s4")
"""The split tactic's configurations the cases run (the library GEMM and two template tiles)."""


def _fused(m: Maker, outs: list[Value], tiles: tuple[str, ...]) -> Case:
    m.g.outputs.extend(outs)
    epilogue_fusion(m.g)
    result = fuse_norm_gemm(m.g)
    assert result.changed, "the pass did not fuse the case's norm"
    (node,) = [n for n in m.g.nodes if n.op == "Fused" and n.attrs["kind"] == "normalized"]
    return Case(node, m.feeds, tiles)


def _norm(m: Maker, x: Value, dt: DType, k: int, rms: bool, beta: bool) -> Value:
    g = m.g.add_initializer("g", (1 + 0.2 * torch.randn(k, generator=m.gen)).to(dt.torch))
    if rms:
        return m.g.add("RMSNormalization", [x, g], {"epsilon": 1e-6}, name="rms")[0]
    ins = [x, g] + ([m.const("beta", (k,), dt, 0.5)] if beta else [])
    return m.g.add("LayerNormalization", ins, {"epsilon": 1e-5}, name="ln")[0]


def ln_bias_gelu(dt: DType, tiles: tuple[str, ...], lead: tuple[int, ...] = (2, 65), k: int = 100,
                 n: int = 96) -> Case:
    """Pre-LN FFN-up: LayerNorm(x) @ W + b -> erf Gelu; x has an offset (the centring matters); K=100 (a K tail)."""
    m = Maker(21)
    x = m.input("x", (*lead, k), dt)
    m.feeds["x"] = (m.feeds["x"].float() * 3 + 2).to(dt.torch)
    y = m.g.add("MatMul", [_norm(m, x, dt, k, False, True), m.weight(k, n, dt)], name="mm")[0]
    y = m.g.add("Add", [y, m.const("b", (n,), dt)], name="bias")[0]
    return _fused(m, [m.g.add("Gelu", [y], {"approximate": "none"}, name="gelu")[0]], tiles)


def ln_kept_residual(dt: DType, tiles: tuple[str, ...], lead: tuple[int, ...] = (3, 50), k: int = 128,
                     n: int = 80) -> Case:
    """Post-LN (BERT): the normalized rows feed the next GEMM and a residual add elsewhere: the node outputs them."""
    m = Maker(22)
    x = m.input("x", (*lead, k), dt)
    h = _norm(m, x, dt, k, False, True)
    y = m.g.add("MatMul", [h, m.weight(k, n, dt)], name="qkv")[0]
    y = m.g.add("Add", [y, m.const("b", (n,), dt)], name="bias")[0]
    z = m.g.add("Mul", [h, m.const("s", (k,), dt)], name="elsewhere")[0]
    return _fused(m, [y, z], tiles)


def rms_bare(dt: DType, tiles: tuple[str, ...], lead: tuple[int, ...] = (1, 1), k: int = 64, n: int = 48) -> Case:
    """RMSNorm (LLaMA-style) then a bare MatMul; one row."""
    m = Maker(23)
    x = m.input("x", (*lead, k), dt)
    return _fused(m, [m.g.add("MatMul", [_norm(m, x, dt, k, True, False), m.weight(k, n, dt)], name="mm")[0]],
                  tiles)


def ln_no_beta_gemm(dt: DType, tiles: tuple[str, ...]) -> Case:
    """LayerNorm without B, then a Gemm with transB and a bias C; M=130, K=96, N=33."""
    m = Maker(24)
    x = m.input("x", (130, 96), dt)
    h = _norm(m, x, dt, 96, False, False)
    y = m.g.add("Gemm", [h, m.weight(96, 33, dt, trans=True), m.const("c", (33,), dt)], {"transB": 1},
                name="fc")[0]
    return _fused(m, [y], tiles)


EVERY = tuple(NORM_TILES)

CASES: dict[str, Callable[[], Case]] = {
    "ln-bias-gelu-f32-every-tile": lambda: ln_bias_gelu(F32, EVERY),
    "ln-bias-gelu-f16": lambda: ln_bias_gelu(F16, ("16x64x256-w4s3", "64x128x64-w4s4")),
    "ln-kept-residual-f16": lambda: ln_kept_residual(F16, ("32x64x128-w4s4", "64x64x64-w4s4")),
    "ln-kept-residual-f32": lambda: ln_kept_residual(F32, ("128x128x64-w4s4",)),
    "rms-bare-m1-f16": lambda: rms_bare(F16, ("16x64x256-w4s3",)),
    "rms-bare-f32": lambda: rms_bare(F32, ("64x64x64-w4s4",), lead=(70,)),
    "ln-no-beta-gemm-f16": lambda: ln_no_beta_gemm(F16, ("32x64x128-w4s4",)),
    # K = 1000 in chunks of 64 (64 rows a program): the statistics merged across 16 chunks, the last one ragged
    "ln-long-rows-chunked-f32": lambda: ln_bias_gelu(F32, ("64x64x64-w4s4", "128x128x64-w4s4"), lead=(70,), k=1000,
                                                     n=40),
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    return run(CASES[name](), device)


def run(case: Case, device: str = "cpu") -> dict[str, str | None]:
    """{config: what differs, or None} for every tile of the fused tactic (statistics in, before and after the
    main loop), every tile of its TMA form (where A's rows suit TMA) and every SPLIT configuration."""
    node = case.node
    args = inputs(node, case.feeds, device)
    want = OPS[node.op].ref(RefCtx(node), list(args))
    out: dict[str, str | None] = {}
    runs: list[tuple[str, str, dict[str, str]]] = [
        ("triton.norm_gemm", f"{t} stats {where}", {"tile": t, "stats": where})
        for t in case.tiles for where in ("loop", "before", "after")]
    x = node.inputs[0]
    if x is not None and x.shape is not None and (x.shape[-1] * x.dtype.torch.itemsize) % 16 == 0:  # TMA rows
        runs += [("triton.norm_gemm_tma", t, {"tile": t}) for t in NORM_TMA_TILES]
    runs += [("split.norm_gemm", g, {"gemm": g}) for g in SPLIT]
    for tactic_name, label, config in runs:
        tactic = registry.get(tactic_name)
        if not tactic.applicable(node, CUDA):
            out[f"{tactic_name} {label}"] = "not applicable"
            continue
        got = tactic.build(node, config, CUDA)(list(args))
        if len(got) != len(want):
            out[f"{tactic_name} {label}"] = f"{len(got)} outputs, expected {len(want)}"
            continue
        problems = [compare(a, b, tolerance(node)) for a, b in zip(got, want)]
        out[f"{tactic_name} {label}"] = next((p for p in problems if p is not None), None)
    return out
