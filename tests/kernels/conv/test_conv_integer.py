"""`cuda.conv_integer`: ConvInteger and QLinearConv as an exact int8 GEMM over the input's patches - equal to the
op table's reference bit for bit (CPU here, and on a GPU in the gpu tier), and what it leaves to the reference."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
U8, I8 = DType.UINT8, DType.INT8


def _case(op: str, x_dtype: DType, *, zero: bool = True, per_channel: bool = False, bias: bool = False,
          attrs: dict[str, Any] | None = None, shape: tuple[int, ...] = (2, 8, 9, 11), m: int = 16,
          kernel: tuple[int, ...] = (3, 3), seed: int = 0) -> tuple[Node, list[Any]]:
    """One ConvInteger/QLinearConv node over random 8-bit data (constant weight, scales and zero points) and its
    arguments."""
    g = Graph()
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (0, 256) if x_dtype is U8 else (-128, 128)
    x = g.add_input("x", TensorType(x_dtype, shape))
    group = int((attrs or {}).get("group", 1))
    w = torch.randint(-127, 128, (m, shape[1] // group, *kernel), generator=gen, dtype=torch.int8)
    xz = torch.tensor(117 if x_dtype is U8 else -9, dtype=x_dtype.torch) if zero else None

    def const(name: str, t: torch.Tensor | None) -> Any:
        return None if t is None else g.add_initializer(name, t)

    if op == "ConvInteger":
        ins = [x, const("w", w), const("xz", xz)]
    else:
        xz = xz if xz is not None else torch.tensor(0, dtype=x_dtype.torch)
        ws = torch.rand(m, generator=gen) * 0.01 + 0.002 if per_channel else torch.tensor(0.004)
        ins = [x, const("xs", torch.tensor(0.03)), const("xz", xz), const("w", w), const("ws", ws),
               const("wz", torch.zeros(m if per_channel else (), dtype=torch.int8)), const("ys", torch.tensor(0.4)),
               const("yz", torch.tensor(7 if x_dtype is U8 else -2, dtype=x_dtype.torch))]
        if bias:
            ins.append(const("b", torch.randint(-2000, 2000, (m,), generator=gen, dtype=torch.int32)))
    g.outputs.extend(g.add(op, ins, attrs or {}, name="qconv", outputs=1))
    data = torch.randint(lo, hi, shape, generator=gen).to(x_dtype.torch)
    args = [data, *(None if v is None else v.data for v in g.nodes[0].inputs[1:])]
    return g.nodes[0], args


CASES = {
    "conv-integer-uint8-zero-point": lambda: _case("ConvInteger", U8, attrs={"pads": (1, 1, 1, 1)}),
    "conv-integer-int8-no-zero-point": lambda: _case("ConvInteger", I8, zero=False, attrs={"strides": (2, 2)}),
    "conv-integer-same-upper-dilated": lambda: _case("ConvInteger", U8, attrs={"auto_pad": "SAME_UPPER",
                                                                              "dilations": (2, 2)}),
    "qlinear-uint8-per-channel-bias": lambda: _case("QLinearConv", U8, per_channel=True, bias=True,
                                                    attrs={"pads": (0, 1, 2, 1)}),
    "qlinear-int8-per-tensor": lambda: _case("QLinearConv", I8, attrs={"pads": (1, 1, 1, 1), "strides": (2, 1)}),
    "qlinear-1x1-int8-bias": lambda: _case("QLinearConv", I8, bias=True, kernel=(1, 1), shape=(3, 16, 5, 5), m=24),
    "qlinear-one-row": lambda: _case("QLinearConv", U8, kernel=(3, 3), shape=(1, 8, 3, 3), m=8),
}


def _check(name: str, device: torch.device) -> None:
    node, args = CASES[name]()
    t = registry.get("cuda.conv_integer")
    assert t.applicable(node, device)
    want = OPS[node.op].ref(RefCtx(node), list(args))[0]
    got = t.build(node, {}, device)([a.to(device) if isinstance(a, torch.Tensor) else a for a in args])[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want), (got.cpu().int() - want.int()).abs().max()


@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_reference_bit_for_bit(name: str) -> None:
    _check(name, CPU)


def test_what_it_leaves_to_the_reference() -> None:
    t = registry.get("cuda.conv_integer")
    grouped, _ = _case("ConvInteger", U8, attrs={"group": 2}, m=16)
    assert not t.applicable(grouped, CPU)
    node, _ = _case("QLinearConv", U8)
    w = node.inputs[3]
    assert w is not None and isinstance(w.data, torch.Tensor)
    w.data = w.data.to(torch.uint8)  # a uint8 weight: left to the reference
    assert not t.applicable(node, CPU)
    node, _ = _case("QLinearConv", U8)
    wz = node.inputs[5]
    assert wz is not None and isinstance(wz.data, torch.Tensor)
    wz.data = torch.tensor(3, dtype=torch.int8)  # a non-zero weight zero point
    assert not t.applicable(node, CPU)
    node, _ = _case("ConvInteger", U8, shape=(2, 8, 9), kernel=(3,))  # 1-D
    assert not t.applicable(node, CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_equals_the_reference_on_the_gpu() -> None:
    for name in CASES:
        _check(name, CUDA)
    node, args = _case("QLinearConv", U8, per_channel=True, bias=True, shape=(8, 64, 28, 28), m=128,
                       attrs={"pads": (1, 1, 1, 1)})  # a ResNet-sized layer: K = 576, M = 128 on _int_mm
    t = registry.get("cuda.conv_integer")
    want = OPS[node.op].ref(RefCtx(node), list(args))[0]
    got = t.build(node, {}, CUDA)([a.cuda() if isinstance(a, torch.Tensor) else a for a in args])[0]
    assert torch.equal(got.cpu(), want)
