"""`km.quotient`: y / s as IEEE float32 division rounds it, from the product with the rounded reciprocal and one FMA
correction. The algorithm is checked here in exact float64 emulation (CPU), the GPU body's compile for sm_90 off the
GPU (a subprocess without the interpreter), and the kernel itself against torch's division on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

F16_FINITE = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
"""Every positive finite float16 value (subnormals included), as float32."""


def _rn32_of_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 rounding of the exact sum of float64 a and b (an FMA's single rounding): their float64 sum, then its
    error (TwoSum, exact) settles a sum that fell on a float32 midpoint."""
    s = a + b
    bb = s - a
    t = (a - (s - bb)) + (b - bb)
    r = s.float()
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    down = torch.nextafter(r, torch.full_like(r, float("-inf")))
    r = torch.where((s == (r.double() + up.double()) / 2) & (t > 0), up, r)
    return torch.where((s == (r.double() + down.double()) / 2) & (t < 0), down, r)


def _markstein(y: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the corrected quotient, the bare product y * r, the IEEE quotient) for float32 y and s, each float32 step
    emulated exactly in float64 (products of two float32 values are exact there, and so is the residual)."""
    y64, s64 = y.double(), s.double()
    r = (1.0 / s64).float().double()  # tl.div_rn(1.0, s)
    q = (y64 * r).float().double()  # y * r
    e = (y64 - q * s64).float().double()  # fma(-q, s, y)
    return _rn32_of_sum(q, e * r), q.float(), (y64 / s64).float()  # fma(e, r, q)


def test_the_corrected_product_is_the_ieee_quotient() -> None:
    """Every positive float16 y by 300 float16 scales (the extremes, powers of two, odd mantissas, random), and 2
    million random float32 pairs: the corrected product equals the IEEE quotient everywhere, where the bare product
    does not (so the check can fail)."""
    g = torch.Generator().manual_seed(0)
    normal = F16_FINITE[F16_FINITE >= 2.0 ** -14]
    picks = torch.cat([normal[:8], normal[-8:], torch.tensor([0.5, 1.0, 3.0, 0.1, 0.3, 7.0, 65504.0]),
                       normal[torch.randint(0, len(normal), (277,), generator=g)]])
    y = F16_FINITE[None, :].expand(len(picks), -1).reshape(-1)
    s = picks[:, None].expand(-1, len(F16_FINITE)).reshape(-1)
    got, bare, want = _markstein(y, s)
    assert torch.equal(got, want)
    assert int((bare != want).sum()) > len(y) // 10  # a plain product is off in about a quarter of the cases
    assert int((bare.half() != want.half()).sum()) > 0  # ... and some of those round to another float16
    e1, e2 = (torch.randint(-60, 60, (2_000_000,), generator=g).double() for _ in range(2))
    y32 = ((torch.rand(2_000_000, generator=g, dtype=torch.float64) + 1) * 2.0 ** e1).float()
    s32 = ((torch.rand(2_000_000, generator=g, dtype=torch.float64) + 1) * 2.0 ** e2).float()
    got, _, want = _markstein(y32, s32)
    assert torch.equal(got, want)


_COMPILE = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from kiln.kernels.pointwise import mathlib as km

    @triton.jit
    def k(x_ptr, out_ptr, s, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        y = tl.load(x_ptr + o)
        tl.store(out_ptr + o, km.quotient(y, s, tl.div_rn(1.0, s)) + km.quotient(y, 3.0, 0.3333333432674408))

    src = triton.compiler.ASTSource(fn=k, signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "s": "fp32",
                                                     "BLOCK": "constexpr"}, constexprs={"BLOCK": 256})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    print(" ".join(sorted({w for line in ptx.splitlines() for w in line.split()
                           if w.startswith(("div.", "fma.", "mul.f32"))})))
""")


def test_the_gpu_form_compiles_for_hopper_off_the_gpu(tmp_path) -> None:
    """The GPU body (not run by the interpreter tests) compiles for sm_90, with a scalar and a literal divisor, to
    products and FMAs - one exact division, of the scalar's reciprocal, and no approximate `div.full`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[3] / "src"), env.get("PYTHONPATH", "")])
    script = tmp_path / "compile_quotient.py"  # why: Triton reads a jit function's source from its file
    script.write_text(_COMPILE)
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the offline compile took over 300 s")
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("this triton has no bundled ptxas")
    assert done.returncode == 0, done.stderr[-2000:]
    ops = done.stdout.split()
    assert "fma.rn.f32" in ops and "div.rn.f32" in ops and "mul.f32" in ops, ops
    assert not any(op.startswith("div.full") for op in ops), ops


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_quotient_on_cuda_matches_torch_division() -> None:
    """On the GPU: every float16 y (both signs, zeros, infinities, NaN) by 64 float16 scales, and 4 million random
    float32 pairs - bit for bit torch's IEEE division."""
    import triton
    import triton.language as tl

    from kiln.kernels.pointwise import mathlib as km

    @triton.jit
    def divide(y_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        s = tl.load(s_ptr)
        tl.store(out_ptr + o, km.quotient(tl.load(y_ptr + o, mask=m), s, tl.div_rn(1.0, s)), mask=m)

    cuda = torch.device("cuda")
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    y16 = torch.cat([F16_FINITE, -F16_FINITE, specials]).to(cuda)
    g = torch.Generator().manual_seed(1)
    normal = F16_FINITE[F16_FINITE >= 2.0 ** -14]
    scales = torch.cat([normal[:4], normal[-4:], normal[torch.randint(0, len(normal), (56,), generator=g)]])
    e1, e2 = (torch.randint(-60, 60, (4_000_000,), generator=g).double() for _ in range(2))
    y32 = ((torch.rand(4_000_000, generator=g, dtype=torch.float64) + 1) * 2.0 ** e1).float().to(cuda)
    s32 = ((torch.rand(64, generator=g, dtype=torch.float64) + 1) * 2.0 ** e2[:64]).float()
    for y, ss in ((y16, scales), (y32, s32)):
        out = torch.empty_like(y)
        for s in ss.tolist():
            sd = torch.tensor([s], dtype=torch.float32, device=cuda)
            divide[(triton.cdiv(y.numel(), 1024),)](y, sd, out, y.numel(), BLOCK=1024)
            want = y / sd
            same = (out.view(torch.int32) == want.view(torch.int32)) | (out.isnan() & want.isnan())
            assert bool(same.all()), (s, y[~same][:5].tolist(), out[~same][:5].tolist(), want[~same][:5].tolist())
