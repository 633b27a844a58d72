"""`triton.int8_gemm`: quantized MatMul/Gemm layers (int8 x int8 -> int32, dequantized per output channel, epilogue
and requantization in registers) under the Triton CPU interpreter against the folded node's reference; what it
takes and refuses; its source."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType
from kiln.kernels import registry
from kiln.kernels.gemm.triton_gemm import INT8_TILES, quantized_spec, source
from tests.kernels.gemm.cases import CUDA, bare
from tests.kernels.gemm.int8_cases import CASES, quantized
from tests.kernels.interpreted import case_result, run_cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.gemm.int8_cases", tmp_path_factory.mktemp("int8gemm"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and all(p is None for p in problems.values()), problems


def test_applies_to_quantized_gemms_only_and_before_the_int_mm_tactic() -> None:
    node, _ = CASES["bias-relu-every-tile"]()
    t = registry.get("triton.int8_gemm")
    assert t.applicable(node, CUDA) and not t.applicable(node, torch.device("cpu"))
    assert t.min_opt_level == 0 and t.priority < registry.get("cuda.int8_gemm").priority
    assert [c["tile"] for c in t.configs()] == list(INT8_TILES)
    float_node = bare(DType.FLOAT32, (4,), 8, 8, ("128x128x64-w4s4",)).node
    assert not t.applicable(float_node, CUDA)  # a float MatMul: triton.gemm's
    assert not registry.get("triton.gemm").applicable(node, CUDA)


def test_the_source_accumulates_in_int32_and_dequantizes_before_the_epilogue() -> None:
    node, _ = quantized((130,), 128, 64, act="Gelu", requant=True, half=True)
    s = quantized_spec(node)
    assert s is not None and s.dq is not None and str(s.out) == "int8"
    text = source(s)
    assert "dtype=tl.int32" in text and "out_dtype=tl.int32" in text
    assert text.index("dq_ptr + offs_n") < text.index("tl.store")


def test_refuses_zero_points_and_per_tensor_weight_scales_it_cannot_take() -> None:
    node, _ = quantized((8,), 16, 8)
    body = node.attrs["body"]
    dw = body.nodes[1]
    sw = node.inputs[body.inputs.index(dw.inputs[1])]
    assert sw is not None and isinstance(sw.data, torch.Tensor)
    sw.data = sw.data[:1].clone()  # one scale for 8 output channels: not the per-channel layout
    assert quantized_spec(node) is None


def test_tma_tiles_read_through_descriptors_and_refuse_what_tma_cannot_read() -> None:
    from kiln.kernels.gemm.triton_gemm import _tma_ready
    from kiln.utils.errors import UnsupportedError

    node, _ = quantized((130,), 128, 64)
    s = quantized_spec(node)
    assert s is not None
    text = source(s, tma=True)
    assert "x_desc.load" in text and "w_desc.load" in text and "x_ptrs" not in text
    ragged, _ = CASES["gemm-transb-bias-ragged-k"]()  # K = 200: rows of 200 bytes are not 16-byte multiples
    with pytest.raises(UnsupportedError, match="16 bytes"):
        registry.get("triton.int8_gemm").build(ragged, {"tile": "tma-64x128x128-w4s4"}, CUDA)
    a = torch.zeros(64, 48, dtype=torch.int8)
    assert _tma_ready(a) and not _tma_ready(a[:, 1:]) and not _tma_ready(a.t())



def test_float8_layers_take_the_fp8_template_with_float32_sums_and_a_float8_store() -> None:
    """`triton.fp8_gemm` takes the float8 layers (one weight scale) and `triton.int8_gemm` the int8 ones; the float8
    source sums in float32 (no int32 accumulator), multiplies by the two scales before the epilogue and, for a layer
    that quantizes for the next one, stores float8. Its numbers are checked on the GPU (tests/kernels/gemm/test_gpu.py):
    the Triton interpreter's float8 conversion is wrong."""
    f8, _ = quantized((130,), 128, 64, act="Gelu", requant=True, half=True, fp8=True)
    i8, _ = quantized((130,), 128, 64, act="Gelu", requant=True, half=True)
    t8, ti = registry.get("triton.fp8_gemm"), registry.get("triton.int8_gemm")
    assert t8.applicable(f8, CUDA) and not t8.applicable(i8, CUDA) and not t8.applicable(f8, torch.device("cpu"))
    assert ti.applicable(i8, CUDA) and not ti.applicable(f8, CUDA)
    assert t8.priority < registry.get("cuda.fp8_gemm").priority
    s = quantized_spec(f8, DType.FLOAT8_E4M3FN)
    assert s is not None and s.out is DType.FLOAT8_E4M3FN and s.dtype is DType.FLOAT8_E4M3FN
    text = source(s)
    assert "int32" not in text and "tl.float8e4nv" in text and "input_precision" not in text
    assert "max_num_imprecise_acc=128" in text  # float32 partial sums every 128 products, as cuBLASLt
    # a float16 layer's erf GELU is the narrow form (half the instructions of the erf formula)
    assert text.index("dq_ptr + offs_n") < text.index("km.gelu_narrow") < text.index("448.0") < text.index("tl.store")
    # the int8 layer's requantizing step rounds and saturates by float adds (no rint, no float-to-int conversion)
    text8 = source(quantized_spec(i8))
    assert "round_even" not in text8 and "km.round_to_8bit(" in text8


def test_fp8_fast_accumulation_only_for_short_reductions() -> None:
    """`triton.fp8_gemm_fast` renders the float8 product without float32 promotion, takes layers of at most
    FP8_FAST_MAX_K products (a longer sum drifts past the tuner's check: measured on an H100 at K=3072), ranks after
    cuBLASLt and the promoted tiles, and is a float8-only form."""
    from kiln.kernels.gemm.triton_gemm import FP8_FAST_MAX_K, FP8_FAST_TILES, render

    fast, promoted, cublas = (registry.get(n) for n in ("triton.fp8_gemm_fast", "triton.fp8_gemm", "cuda.fp8_gemm"))
    short, _ = quantized((130,), FP8_FAST_MAX_K, 64, act="Gelu", requant=True, half=True, fp8=True)
    long, _ = quantized((130,), FP8_FAST_MAX_K + 16, 64, act=None, half=True, fp8=True)
    assert fast.applicable(short, CUDA) and not fast.applicable(long, CUDA) and promoted.applicable(long, CUDA)
    i8, _ = quantized((130,), 128, 64, act=None, half=True)
    assert not fast.applicable(i8, CUDA)
    assert promoted.priority < cublas.priority < fast.priority
    assert FP8_FAST_TILES and all(t.fast and t.tma for t in FP8_FAST_TILES.values())
    s = quantized_spec(short, DType.FLOAT8_E4M3FN)
    assert s is not None
    text = render(s, False, tma=True, subtile=2, fast=True)
    assert "max_num_imprecise_acc" not in text and "tl.dot(" in text and "tl.float8e4nv" in text
    assert "max_num_imprecise_acc=128" in render(s, False, tma=True, subtile=2)
    s8 = quantized_spec(i8)
    assert s8 is not None
    with pytest.raises(ValueError, match="float8"):
        render(s8, False, fast=True)
