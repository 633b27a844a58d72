"""`cuda.conv_padc`: convs with input channels that are not a multiple of 8 (RGB stems) run with zero channels
added to the input and weight; the kernel is torch, so its arithmetic is checked here on CPU tensors (the cuDNN
path itself runs in the GPU tier)."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from tests.kernels.conv.cases import CUDA, F32, Maker, inputs, relu


@pytest.mark.parametrize("cl", [True, False], ids=["channels-last", "nchw"])
def test_padded_channels_give_the_same_convolution(cl: bool) -> None:
    m = Maker(11)
    case = m.finish(relu(m, m.conv(F32, (2, 3, 15, 15), 16, (7, 7), cl=cl, stride=(2, 2), pad=(3, 3))), ())
    t = registry.get("cuda.conv_padc")
    assert t.applicable(case.node, CUDA)
    args = inputs(case.node, case.feeds)
    want = OPS[case.node.op].ref(RefCtx(case.node), list(args))[0]
    got = t.build(case.node, {"fuse": "pointwise", "format": "given"}, CUDA)(list(args))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def test_only_for_unaligned_ungrouped_convs() -> None:
    m = Maker(12)
    aligned = m.finish(m.conv(F32, (1, 16, 8, 8), 8, (3, 3), pad=(1, 1)), ())
    m = Maker(13)
    grouped = m.finish(m.conv(F32, (1, 6, 8, 8), 6, (3, 3), pad=(1, 1), group=3), ())
    t = registry.get("cuda.conv_padc")
    assert not t.applicable(aligned.node, CUDA) and not t.applicable(grouped.node, CUDA)
