"""`triton.gemm` on a real GPU: every interpreter case compiled for CUDA, BERT-base / ViT-B shapes in float16 and
bfloat16 for every tile, float32 with and without TF32, offsets past 2**31, CUDA graph capture. Run with
`pytest -m gpu tests/kernels/gemm` on a machine with an NVIDIA GPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from tests.kernels.gemm import cases as c
from tests.kernels.gemm import int8_cases as q8
from tests.kernels.gemm import next_cases, norm_cases, split_cases
from tests.kernels.gemm.cases import ALL, CASES, CUDA, F16, F32, Case, bare, bias_gelu_residual, inputs, run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

BF16 = DType.BFLOAT16

SHAPES: dict[str, Callable[[DType], Case]] = {
    # BERT-base, batch 128 x 128 tokens: the MLP up (K=768, N=3072) and down (K=3072, N=768) projections
    "bert-up": lambda dt: bias_gelu_residual(dt, "tanh", ALL, lead=(128, 128), k=768, n=3072),
    "bert-down": lambda dt: bias_gelu_residual(dt, "none", ALL, lead=(128, 128), k=3072, n=768),
    # ViT-B/16, batch 128 x 197 tokens: the fused QKV projection (N=2304)
    "vit-qkv": lambda dt: bare(dt, (128, 197), 768, 2304, ALL),
    # batch 1: BERT (M=128), ViT (M=197), one token (M=1)
    "bert-b1-up": lambda dt: bias_gelu_residual(dt, "none", ALL, lead=(1, 128), k=768, n=3072),
    "vit-b1-qkv": lambda dt: bare(dt, (1, 197), 768, 2304, ALL),
    "one-row": lambda dt: bias_gelu_residual(dt, "tanh", ALL, lead=(1,), k=768, n=768),
    # batch 1: the N=768 GEMMs with few output tiles (BERT's FFN-down, ViT's attention output + residual)
    "bert-b1-down": lambda dt: bias_gelu_residual(dt, "none", ALL, lead=(1, 128), k=3072, n=768),
    "vit-b1-proj": lambda dt: bias_gelu_residual(dt, "none", ALL, lead=(1, 197), k=768, n=768),
}


@pytest.mark.parametrize("name", list(norm_cases.CASES))
def test_normalized_case_on_cuda(name: str) -> None:
    problems = norm_cases.run_case(name, "cuda")
    assert all(p is None for p in problems.values()), problems


NORMALIZED: dict[str, Callable[[], Case]] = {
    # batch 1: ViT's pre-LN FFN-up (197 rows), BERT's post-LN QKV (128 rows, the rows kept), one token; and larger
    "vit-b1-up": lambda: norm_cases.ln_bias_gelu(F16, norm_cases.EVERY, lead=(1, 197), k=768, n=3072),
    "bert-b1-qkv-kept": lambda: norm_cases.ln_kept_residual(F16, norm_cases.EVERY, lead=(1, 128), k=768, n=2304),
    "one-row-up": lambda: norm_cases.ln_bias_gelu(F16, norm_cases.EVERY, lead=(1, 1), k=768, n=3072),
    "rows-4096-up-bf16": lambda: norm_cases.ln_bias_gelu(BF16, norm_cases.EVERY, lead=(8, 512), k=768, n=3072),
}


@pytest.mark.parametrize("name", list(NORMALIZED))
def test_normalized_transformer_shapes(name: str) -> None:
    """A LayerNorm and the GEMM reading it, both tactics (every fused tile, the split's GEMMs), at model shapes."""
    problems = norm_cases.run(NORMALIZED[name](), "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("name", list(next_cases.CASES))
def test_next_tiles_case_on_cuda(name: str) -> None:
    problems = next_cases.run_case(name, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("dt", [F16, BF16], ids=str)
def test_next_tiles_at_bert_shapes(dt: DType) -> None:
    """The tiles under evaluation on BERT-base's FFN-up + GELU + residual at batch 128 (M=16384, K=768, N=3072)."""
    case = bias_gelu_residual(dt, "none", next_cases.FLOAT, lead=(128, 128), k=768, n=3072)
    problems = next_cases.run_float(case, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("name", list(CASES))
def test_case_on_cuda(name: str) -> None:
    problems = c.run_case(name, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("dt", [F16, BF16], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_model_shapes_every_tile(name: str, dt: DType) -> None:
    problems = run(SHAPES[name](dt), "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("tf32", [False, True])
def test_float32_with_and_without_tf32(tf32: bool) -> None:
    flags = torch.backends.cuda.matmul
    before = flags.allow_tf32
    try:
        flags.allow_tf32 = tf32  # read by the tactic at build time and by the reference's matmul
        problems = run(bias_gelu_residual(F32, "none", ALL, lead=(4, 197), k=768, n=2304), "cuda",
                       tol=5e-3 if tf32 else 1e-4)
    finally:
        flags.allow_tf32 = before
    assert all(p is None for p in problems.values()), problems


@pytest.mark.big_gpu_memory
def test_offsets_past_2_31() -> None:
    m, k, n = 2_800_000, 64, 768  # an output of 2.15e9 elements: int64 index math
    g = Graph()
    x = g.add_input("x", TensorType(F16, (m, k)))
    w = g.add_initializer("w", (torch.randn(k, n, device=CUDA) * k ** -0.5).half())
    g.outputs.append(g.add("MatMul", [x, w], name="mm")[0])
    xs = torch.randn(m, k, device=CUDA, dtype=torch.float16)
    got = registry.get("triton.gemm").build(g.nodes[0], {"tile": "128x128x64-w4s4"}, CUDA)([xs, w.data])[0]
    for rows in (slice(0, 256), slice(m - 256, m)):
        want = (xs[rows].float() @ w.data.float()).half()
        torch.testing.assert_close(got[rows], want, rtol=1e-2, atol=1e-2)


def test_capture_in_a_cuda_graph() -> None:
    case = SHAPES["bert-b1-up"](F16)
    c.constants_to(case.node, "cuda")
    args = inputs(case.node, case.feeds, "cuda")
    kernel = registry.get("triton.gemm").build(case.node, {"tile": "64x128x64-w4s4"}, CUDA)
    eager = kernel(list(args))[0]  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel(list(args))[0]
    captured.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


# --- triton.gemm_splitk -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(split_cases.CASES))
def test_split_case_on_cuda(name: str) -> None:
    problems = split_cases.run_case(name, "cuda")
    tiles = split_cases.LAST if name == "last-sums-twice" else split_cases.SPLIT
    assert set(problems) == set(tiles) and all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("dt", [F16, BF16], ids=str)
@pytest.mark.parametrize("name", ["bert-b1-down", "vit-b1-proj", "bert-b1-up", "vit-b1-qkv", "one-row"])
def test_split_k_at_batch_1_shapes(name: str, dt: DType) -> None:
    case = SHAPES[name](dt)
    problems = run(Case(case.node, case.feeds, split_cases.SPLIT), "cuda", tactic_name="triton.gemm_splitk")
    assert len(problems) == len(split_cases.SPLIT) and all(p is None for p in problems.values()), problems


def test_split_k_replays_in_a_cuda_graph_and_unsplits_a_full_grid() -> None:
    """The workspace comes from the capture's pool; replays give the eager result. A batch-128 shape on the same
    kernel (enough tiles to fill the GPU) takes the unsplit kernel and agrees with the reference."""
    case = SHAPES["bert-b1-down"](F16)
    c.constants_to(case.node, "cuda")
    args = inputs(case.node, case.feeds, "cuda")
    kernel = registry.get("triton.gemm_splitk").build(case.node, {"tile": "64x64x64-w4s4-k4"}, CUDA)
    eager = kernel(list(args))[0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel(list(args))[0]
    for _ in range(3):
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
    big = [a.repeat(64, 1, 1) if isinstance(a, torch.Tensor) and a.dim() == 3 else a for a in args]
    want = OPS["Fused"].ref(RefCtx(case.node), list(big))[0]
    assert c.compare(kernel(list(big))[0], want, c.tolerance(case.node)) is None


# --- triton.int8_gemm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(q8.CASES))
def test_int8_case_on_cuda(name: str) -> None:
    problems = q8.run_case(name, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.parametrize(("lead", "k", "n", "kw"), [
    ((128, 128), 768, 2304, {"act": None, "half": True}),  # BERT-base batch 128: the packed QKV projection
    ((128, 128), 768, 3072, {"act": "Gelu", "half": True, "requant": True}),  # MLP up, int8 out for MLP down
    ((128, 128), 3072, 768, {"act": None, "residual": True, "half": True}),  # MLP down + residual
    ((1, 128), 768, 768, {"act": None, "residual": True, "half": True}),  # batch 1: the attention output
], ids=["bert-qkv", "bert-up-requant", "bert-down-residual", "bert-b1-out"])
def test_int8_bert_shapes_every_tile(lead: tuple[int, ...], k: int, n: int, kw: dict) -> None:
    node, args = q8.quantized(lead, k, n, **kw)
    problems = q8.run(node, args, q8.ALL, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 conversion needs sm_89+")
@pytest.mark.parametrize("name", ["fp16-saturate-nan", "fp32-ragged"])
def test_fp8_quantize_on_cuda_is_exact(name: str) -> None:
    from tests.kernels.gemm import fp8_cases

    problems = fp8_cases.run_case(name, "cuda")
    assert all(p is None for p in problems.values()), problems


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 GEMMs need sm_89+")
@pytest.mark.parametrize(("lead", "k", "n", "kw"), [
    ((128, 128), 768, 3072, {"act": "Gelu", "half": True, "requant": True}),  # BERT-base FFN up, float8 out
    ((128, 128), 3072, 768, {"act": None, "residual": True, "half": True}),  # FFN down + residual, float16 out
    ((1, 128), 768, 2304, {"act": None, "half": True}),  # batch 1, the packed QKV projection
    ((33,), 200, 40, {"gemm": True, "act": None}),  # float32, a Gemm with transB, K not a multiple of the step
], ids=["bert-up-gelu-fp8-out", "bert-down-residual", "bert-b1-qkv", "gemm-ragged-f32"])
def test_fp8_gemm_every_tile(lead: tuple[int, ...], k: int, n: int, kw: dict) -> None:
    from kiln.kernels.gemm.triton_gemm import FP8_FAST_MAX_K, FP8_FAST_TILES, FP8_NEXT_TILES, FP8_TILES
    from tests.kernels.gemm import fp8_cases

    node, args = fp8_cases.fp8_layer(lead, k, n, **kw)
    for tactic, space in (("triton.fp8_gemm", FP8_TILES), ("triton.fp8_gemm_next", FP8_NEXT_TILES),
                          ("triton.fp8_gemm_fast", FP8_FAST_TILES)):
        tiles = tuple(t for t in space if k % 16 == 0 or not t.startswith("tma"))  # TMA: 16-byte rows
        problems = fp8_cases.run_gemm(node, args, tiles, tactic) if tiles else {}
        if tactic == "triton.fp8_gemm_fast" and k > FP8_FAST_MAX_K:  # long sums stay promoted
            assert problems == {"applicable": "refused"}
            continue
        assert all(p is None for p in problems.values()), (tactic, problems)
        assert problems or tactic != "triton.fp8_gemm"  # the others' tiles are all TMA


@pytest.mark.parametrize(("x", "n", "kw"), [
    ((128, 256, 56, 56), 64, {"half": True, "requant": True}),  # ResNet-50 layer1 conv1: requantizes for the 3x3
    ((128, 64, 56, 56), 256, {"half": True}),  # layer1 conv3 (float16 out, the residual add's input)
    ((1, 2048, 7, 7), 512, {"half": True}),  # batch 1, layer4
    ((128, 64, 56, 56), 256, {"half": True, "residual": True, "requant": True}),  # conv3 + int8 skip, int8 out
], ids=["l1-reduce-requant", "l1-expand", "l4-b1", "l1-expand-int8-residual"])
def test_int8_conv1x1_resnet50_shapes_every_tile(x: tuple[int, int, int, int], n: int, kw: dict) -> None:
    node, args = q8._conv1x1(x, n, **kw)
    problems = q8.run(node, args, q8.ALL, "cuda")
    assert all(p is None for p in problems.values()), problems
