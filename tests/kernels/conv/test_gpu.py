"""`triton.conv` on a real GPU: every interpreter case compiled for CUDA, ResNet-50 conv shapes (batch 128 and 1,
channels-last) in float16 and bfloat16 for every tile, an NCHW input, float32 with and without TF32, offsets past
2**31, CUDA graph capture. Run with `pytest -m gpu tests/kernels/conv` on a machine with an NVIDIA GPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kiln.ir import DType, Graph, TensorType
from kiln.kernels import registry
from tests.kernels.conv import cases as c
from tests.kernels.conv import depthwise_cases as d
from tests.kernels.conv import int8_cases as q8
from tests.kernels.conv import stem_cases as stem
from tests.kernels.conv import thin_cases as thin
from tests.kernels.conv.cases import ALL, CASES, CUDA, F16, F32, Case, bare, conv_add_relu, conv_relu, inputs, run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

BF16 = DType.BFLOAT16

ShapeMaker = Callable[[DType, int], Case]
"""(dtype, batch) -> a channels-last case at one layer shape of a model, every tile."""

RESNET50: dict[str, ShapeMaker] = {
    "stem-7x7-s2": lambda dt, b: conv_relu(dt, (b, 3, 224, 224), 64, (7, 7), ALL, cl=True, stride=(2, 2),
                                           pad=(3, 3)),
    "l1-1x1-reduce": lambda dt, b: conv_relu(dt, (b, 256, 56, 56), 64, (1, 1), ALL, cl=True),
    "l1-3x3": lambda dt, b: conv_relu(dt, (b, 64, 56, 56), 64, (3, 3), ALL, cl=True, pad=(1, 1)),
    "l1-1x1-expand-add-relu": lambda dt, b: conv_add_relu(dt, (b, 64, 56, 56), 256, (1, 1), ALL, cl=True),
    "l2-3x3-s2": lambda dt, b: conv_relu(dt, (b, 128, 56, 56), 128, (3, 3), ALL, cl=True, stride=(2, 2),
                                         pad=(1, 1)),
    "l2-downsample-1x1-s2": lambda dt, b: bare(dt, (b, 256, 56, 56), 512, (1, 1), ALL, cl=True, stride=(2, 2)),
    "l3-3x3": lambda dt, b: conv_relu(dt, (b, 256, 14, 14), 256, (3, 3), ALL, cl=True, pad=(1, 1)),
    "l4-3x3": lambda dt, b: conv_relu(dt, (b, 512, 7, 7), 512, (3, 3), ALL, cl=True, pad=(1, 1)),
    "l4-1x1-expand-add-relu": lambda dt, b: conv_add_relu(dt, (b, 512, 7, 7), 2048, (1, 1), ALL, cl=True),
}


@pytest.fixture
def exact_reference() -> Iterator[None]:
    """The float16/bfloat16 reference convolves in float32: without TF32, so that it is the more precise side."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("name", list(CASES))
def test_case_on_cuda(name: str, exact_reference: None) -> None:
    problems = c.run_case(name, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("batch", [128, 1])
@pytest.mark.parametrize("dt", [F16, BF16], ids=str)
@pytest.mark.parametrize("name", list(RESNET50))
def test_resnet50_shapes_every_tile(name: str, dt: DType, batch: int, exact_reference: None) -> None:
    problems = run(RESNET50[name](dt, batch), "cuda")
    assert all(p is None for p in problems.values()), problems


def test_an_nchw_input(exact_reference: None) -> None:
    problems = run(conv_add_relu(F16, (8, 64, 56, 56), 64, (3, 3), ALL, pad=(1, 1)), "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("tf32", [False, True])
def test_float32_with_and_without_tf32(tf32: bool) -> None:
    flags = torch.backends.cudnn
    before = flags.allow_tf32
    try:
        flags.allow_tf32 = tf32  # read by the tactic at build time and by the reference's cuDNN convolution
        problems = run(conv_add_relu(F32, (8, 256, 14, 14), 256, (3, 3), ALL, cl=True, pad=(1, 1)), "cuda",
                       tol=1e-2 if tf32 else 1e-4)
    finally:
        flags.allow_tf32 = before
    assert all(p is None for p in problems.values()), problems


@pytest.mark.big_gpu_memory
def test_offsets_past_2_31() -> None:
    shape = (32, 64, 1040, 1040)  # 2.2e9 elements in and out: int64 index math
    g = Graph()
    x = g.add_input("x", TensorType(F16, shape))
    wt = (torch.randn(64, 64, 1, 1, device=CUDA) * 0.125).half()
    g.outputs.append(g.add("Conv", [x, g.add_initializer("w", wt)], name="conv")[0])
    xs = torch.randn(shape, device=CUDA, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    got = registry.get("triton.conv").build(g.nodes[0], {"tile": "128x128x64-w8s3"}, CUDA)([xs, wt])[0]
    for image in (slice(0, 1), slice(31, 32)):
        want = F.conv2d(xs[image].float(), wt.float()).half()
        torch.testing.assert_close(got[image], want, rtol=1e-2, atol=1e-2)


def test_capture_in_a_cuda_graph() -> None:
    case = RESNET50["l1-1x1-expand-add-relu"](F16, 1)
    c.constants_to(case.node, "cuda")
    args = inputs(case.node, case.feeds, "cuda")
    kernel = registry.get("triton.conv").build(case.node, {"tile": "64x64x64-w4s4"}, CUDA)
    eager = kernel(list(args))[0]  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel(list(args))[0]
    captured.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


# --- triton.depthwise and triton.thin_conv (MobileNets) ---------------------------------------------------------

MOBILENET_V3: dict[str, ShapeMaker] = {  # its depthwise layers, channels-last, with their activations
    "dw3x3-c16-relu": lambda dt, b: d.dw(dt, (b, 16, 112, 112), (3, 3), d.ALL, cl=True, pad=(1, 1)),
    "dw3x3-s2-c64-relu": lambda dt, b: d.dw(dt, (b, 64, 112, 112), (3, 3), d.ALL, cl=True, stride=(2, 2),
                                            pad=(1, 1)),
    "dw5x5-s2-c72-relu": lambda dt, b: d.dw(dt, (b, 72, 56, 56), (5, 5), d.ALL, cl=True, stride=(2, 2), pad=(2, 2)),
    "dw3x3-c200-hardswish": lambda dt, b: d.dw(dt, (b, 200, 14, 14), (3, 3), d.ALL, act="HardSwish", cl=True,
                                               pad=(1, 1)),
    "dw5x5-c960-hardswish": lambda dt, b: d.dw(dt, (b, 960, 7, 7), (5, 5), d.ALL, act="HardSwish", cl=True,
                                               pad=(2, 2)),
}


MOBILENET_V3_1X1: dict[str, ShapeMaker] = {  # its 1x1 layers with <= 128 input channels, channels-last
    "16-16-add": lambda dt, b: thin.add((b, 16, 112, 112), 16, thin.ALL, dt),
    "24-72-relu": lambda dt, b: conv_relu(dt, (b, 24, 56, 56), 72, (1, 1), thin.ALL, cl=True),
    "40-240-hardswish": lambda dt, b: c.conv_hardswish(dt, (b, 40, 28, 28), 240, (1, 1), thin.ALL, cl=True),
    "120-40-add": lambda dt, b: thin.add((b, 120, 28, 28), 40, thin.ALL, dt),
    "80-184-hardswish": lambda dt, b: c.conv_hardswish(dt, (b, 80, 14, 14), 184, (1, 1), thin.ALL, cl=True),
    "112-672-hardswish": lambda dt, b: c.conv_hardswish(dt, (b, 112, 14, 14), 672, (1, 1), thin.ALL, cl=True),
    # squeeze-and-excitation scales fused into the projections ("scaled" nodes, opt-in)
    "se-72-40-add-scaled": lambda dt, b: thin.scaled((b, 72, 28, 28), 40, thin.ALL, residual=True, dt=dt),
    "se-672-112-add-scaled": lambda dt, b: thin.scaled((b, 672, 14, 14), 112, thin.ALL, residual=True, dt=dt),
    "se-960-160-scaled": lambda dt, b: thin.scaled((b, 960, 7, 7), 160, thin.ALL, dt=dt),
}


MOBILENET_FAMILIES: dict[str, tuple[Any, str, dict[str, ShapeMaker]]] = {
    "depthwise": (d, "triton.depthwise", MOBILENET_V3),
    "thin": (thin, "triton.thin_conv", MOBILENET_V3_1X1),
}
"""Per kernel family: its interpreter cases module, its tactic, MobileNetV3's layer shapes."""


@pytest.mark.parametrize(("family", "name"), [(f, n) for f, (m, _, _) in MOBILENET_FAMILIES.items() for n in m.CASES])
def test_mobilenet_kernel_case_on_cuda(family: str, name: str) -> None:
    problems = MOBILENET_FAMILIES[family][0].run_case(name, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("batch", [128, 1])
@pytest.mark.parametrize("dt", [F16, BF16], ids=str)
@pytest.mark.parametrize(("family", "name"), [(f, n) for f, (_, _, shapes) in MOBILENET_FAMILIES.items()
                                              for n in shapes])
def test_mobilenet_shapes_every_tile(family: str, name: str, dt: DType, batch: int) -> None:
    _, tactic, shapes = MOBILENET_FAMILIES[family]
    problems = run(shapes[name](dt, batch), "cuda", tactic_name=tactic)
    assert all(p is None for p in problems.values()), problems


# --- triton.stem_conv ------------------------------------------------------------------------------------------

STEMS: dict[str, ShapeMaker] = {  # RGB stems at real sizes, channels-last as the layout pass gives them
    "mobilenet-3x3-s2-16-hardswish": lambda dt, b: c.conv_hardswish(dt, (b, 3, 224, 224), 16, (3, 3), stem.ALL,
                                                                    cl=True, stride=(2, 2), pad=(1, 1)),
    "resnet-7x7-s2-64-relu": lambda dt, b: c.conv_relu(dt, (b, 3, 224, 224), 64, (7, 7), stem.ALL, cl=True,
                                                       stride=(2, 2), pad=(3, 3)),
}


@pytest.mark.parametrize("name", list(stem.CASES))
def test_stem_case_on_cuda(name: str, exact_reference: None) -> None:
    problems = stem.run_case(name, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("batch", [128, 1])
@pytest.mark.parametrize("dt", [F16, BF16], ids=str)
@pytest.mark.parametrize("name", list(STEMS))
def test_stem_real_shapes_every_tile(name: str, dt: DType, batch: int, exact_reference: None) -> None:
    problems = run(STEMS[name](dt, batch), "cuda", tactic_name="triton.stem_conv")
    assert all(p is None for p in problems.values()), problems


# --- cuda.patch_conv ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", [F16, BF16], ids=str)
@pytest.mark.parametrize("batch", [128, 1])
def test_patch_conv_vit_b16_shape(dt: DType, batch: int, exact_reference: None) -> None:
    """ViT-B/16's patch embedding (16x16, stride 16, 3 -> 768), with a HardSwish epilogue run in place."""
    case = c.conv_hardswish(dt, (batch, 3, 224, 224), 768, (16, 16), (), stride=(16, 16))
    t = registry.get("cuda.patch_conv")
    assert t.applicable(case.node, CUDA)
    args = inputs(case.node, case.feeds, "cuda")
    want = c.OPS[case.node.op].ref(c.RefCtx(case.node), list(args))[0]
    got = t.build(case.node, {}, CUDA)(list(args))[0]
    assert c.compare(got, want, c.tolerance(case.node), False) is None


# --- triton.int8_conv -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(q8.CASES))
def test_int8_conv_case_on_cuda(name: str) -> None:
    problems = q8.run_case(name, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("half", [False, True], ids=["fp32-out", "fp16-out"])
@pytest.mark.parametrize(("x", "n", "k", "kw"), [
    ((128, 64, 56, 56), 64, 3, {"pad": (1, 1)}),
    ((128, 256, 56, 56), 64, 1, {}),
    ((1, 512, 7, 7), 512, 3, {"pad": (1, 1)}),
    ((128, 64, 56, 56), 256, 1, {"residual": True, "requant": True}),  # conv3 + the int8 skip, int8 out
], ids=["l1-3x3-bs128", "l1-1x1-bs128", "l4-3x3-bs1", "l1-1x1-int8-residual"])
def test_int8_conv_resnet50_shapes_every_tile(x: tuple[int, int, int, int], n: int, k: int, kw: dict,
                                               half: bool) -> None:
    node, args = q8.quantized(x, n, k, half=half, **kw)
    problems = q8.run(node, args, q8.ALL, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 needs sm_89+")
@pytest.mark.parametrize(("tactic", "x", "n", "k", "kw"), [
    ("triton.fp8_conv", (128, 64, 56, 56), 64, 3, {"pad": (1, 1), "half": True}),  # ResNet-50 layer1 3x3
    ("triton.fp8_conv", (2, 24, 9, 11), 40, 3, {"pad": (1, 1), "requant": True, "half": True}),  # float8 out
    # float8 out from the TMA form too: its epilogue's float8 zero point is a literal tile of [BLOCK_M, BLOCK_N]
    ("triton.fp8_conv", (2, 32, 9, 11), 40, 3, {"pad": (1, 1), "requant": True, "half": True}),
    ("triton.fp8_conv", (1, 16, 9, 9), 24, 3, {"pad": (1, 1), "stride": (2, 2)}),  # float32 out, strided
    ("triton.fp8_gemm", (128, 256, 56, 56), 64, 1, {"half": True}),  # layer1 1x1 on the GEMM template
], ids=["l1-3x3-bs128", "3x3-requant-fp8-out", "3x3-requant-fp8-out-tma", "3x3-s2-f32", "l1-1x1-gemm"])
def test_fp8_conv_every_tile(tactic: str, x: tuple[int, int, int, int], n: int, k: int, kw: dict) -> None:
    """Float8 convs against the folded node's reference, judged as the tuner judges a candidate (float8 sums and
    codes differ from a float16 reference within the FP8 tensor cores' accuracy, not bit for bit)."""
    from kiln.kernels.conv.triton_conv import INT8_TILES
    from kiln.kernels.gemm.triton_gemm import FP8_TILES as GEMM_TILES
    from tests.kernels.quantizing import run

    node, args = q8.quantized(x, n, k, fp8=True, **kw)
    tiles = INT8_TILES if tactic == "triton.fp8_conv" else GEMM_TILES
    # the TMA forms take stride-1 convs whose input rows (C int8/float8 values) are a multiple of 16 bytes
    usable = [t for t, tile in tiles.items() if not tile.tma or (kw.get("stride", (1, 1)) == (1, 1) and x[1] % 16 == 0)]
    problems = run(tactic, node, args, [{"tile": t} for t in usable], "cuda")
    assert problems and all(p is None for p in problems.values()), problems
