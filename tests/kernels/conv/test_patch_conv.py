"""`cuda.patch_conv`: non-overlapping convolutions (ViT's patch embedding) as a permuting copy and one GEMM. The
kernel is plain torch, so it runs here on CPU tensors against the op table's reference; the GPU tier adds
epilogues and ViT's real shape."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from tests.kernels.conv.cases import CUDA, F32, Maker, inputs


def _case(x: tuple[int, int, int, int], n: int, k: int, cl: bool = False, bias: bool = True, **kw: Any) -> Any:
    m = Maker(9)
    y = m.conv(F32, x, n, (k, k), cl=cl, stride=(k, k), bias=bias, **kw)
    return m.finish(y, ())


@pytest.mark.parametrize(("x", "n", "k", "cl", "bias"), [
    ((2, 3, 32, 32), 24, 16, False, True),  # ViT-like, NCHW input
    ((2, 3, 35, 37), 8, 4, True, True),  # a remainder smaller than a window; channels-last input
    ((1, 5, 6, 6), 7, 1, False, False),  # 1x1, stride 1: a GEMM over pixels
], ids=["vit-like", "remainder-cl", "1x1"])
def test_matches_the_reference_and_keeps_the_layout(x: tuple[int, int, int, int], n: int, k: int, cl: bool,
                                                    bias: bool) -> None:
    case = _case(x, n, k, cl, bias)
    t = registry.get("cuda.patch_conv")
    assert t.applicable(case.node, CUDA) and not t.applicable(case.node, torch.device("cpu"))
    args = inputs(case.node, case.feeds)
    want = OPS[case.node.op].ref(RefCtx(case.node), list(args))[0]
    got = t.build(case.node, {}, CUDA)(list(args))[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@pytest.mark.parametrize("kw", [dict(pad=(1, 1)), dict(dil=(2, 2))], ids=["padded", "dilated"])
def test_refuses_overlapping_or_padded_windows(kw: dict[str, Any]) -> None:
    assert not registry.get("cuda.patch_conv").applicable(_case((1, 3, 16, 16), 4, 4, **kw).node, CUDA)
    m = Maker(10)
    overlapping = m.finish(m.conv(F32, (1, 3, 16, 16), 4, (4, 4), stride=(2, 2)), ())
    assert not registry.get("cuda.patch_conv").applicable(overlapping.node, CUDA)
