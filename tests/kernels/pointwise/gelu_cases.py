"""`km.gelu_narrow` (the erf GELU of float16/bfloat16 layers) against float64: every finite float16 and bfloat16
input, and float32 samples for the relative error of the float32 result before the store rounds it. Run by
`test_gelu_narrow.py` under the Triton interpreter (CPU) and by `test_gpu.py` on the GPU, where exp2 is the
hardware's approximation. Each case returns counts and errors; the tests hold the bounds."""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels.pointwise import mathlib as km

BLOCK = 1024


@triton.jit
def _gelu(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = o < n
    x = tl.load(x_ptr + o, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + o, km.gelu_narrow(x), mask=inside)


def narrow_gelu(x: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """gelu_narrow of x (any float dtype) as a float32 tensor on the CPU."""
    xs = x.to(device=device, dtype=torch.float32).contiguous()
    y = torch.empty_like(xs)
    _gelu[(triton.cdiv(xs.numel(), BLOCK),)](xs, y, xs.numel(), BLOCK=BLOCK)
    return y.cpu()


def true_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * Phi(x) in float64, through erfc (no cancellation on either side)."""
    x = x.double()
    return x * 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


def formula_gelu(x: torch.Tensor) -> torch.Tensor:
    """The erf formula in float32, as the generated kernels computed it before (and torch's reference does)."""
    x = x.float()
    return 0.5 * x * (1.0 + torch.erf(x * 0.7071067811865476))


def every(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float type."""
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    return x[torch.isfinite(x)]


def _exhaustive(dtype: torch.dtype, device: str) -> dict[str, Any]:
    x = every(dtype)
    want = true_gelu(x).to(dtype)
    got = narrow_gelu(x, device).to(dtype)
    old = formula_gelu(x).to(dtype)
    off = got != want
    return {"values": x.numel(), "fast_off": int(off.sum()), "formula_off": int((old != want).sum()),
            "largest_off": float(x[off].double().max()) if bool(off.any()) else None,
            "max_steps_off": int((got.view(torch.int16).int() - want.view(torch.int16).int()).abs().max())}


def _float32(device: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.rand(200_000, generator=g) * 12 - 6, torch.randn(200_000, generator=g) * 2]).float()
    want = true_gelu(x)
    rel = ((narrow_gelu(x, device).double() - want).abs() / want.abs().clamp_min(1e-300))
    live = want.abs() > 6e-8  # what a float16 can hold; below it either form is 0 after the store
    return {"max_rel_positive": float(rel[x > 0].max()), "max_rel_negative": float(rel[(x < 0) & live].max())}


def _specials(device: str) -> dict[str, Any]:
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 5.9, -5.9, 6.0, -6.0, 100.0, -100.0, 3e38, -3e38])
    got = narrow_gelu(x, device)
    return {"got": [repr(float(v)) for v in got], "signbits": [bool(torch.signbit(v)) for v in got]}


CASES = {
    "float16-every-value": lambda device: _exhaustive(torch.float16, device),
    "bfloat16-every-value": lambda device: _exhaustive(torch.bfloat16, device),
    "float32-relative-error": _float32,
    "special-values": _specials,
}


def run_case(name: str, device: str = "cpu") -> dict[str, Any]:
    return CASES[name](device)
