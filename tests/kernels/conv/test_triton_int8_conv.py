"""`triton.int8_conv`: quantized convs (int8 x int8 -> int32, dequantized per channel, epilogue in registers) under
the Triton CPU interpreter against the folded node's reference; applicability."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.kernels import registry
from tests.kernels.conv.cases import CUDA, F32, Maker
from tests.kernels.conv.int8_cases import CASES
from tests.kernels.interpreted import case_result, run_cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.conv.int8_cases", tmp_path_factory.mktemp("int8conv"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and all(p is None for p in problems.values()), problems


def test_applies_to_quantized_convs_only() -> None:
    node, _ = CASES["3x3-pad1-relu-cl-every-tile"]()
    t = registry.get("triton.int8_conv")
    assert t.applicable(node, CUDA) and not t.applicable(node, torch.device("cpu"))
    m = Maker(22)
    m.g.outputs.append(m.conv(F32, (1, 8, 5, 5), 8, (3, 3), pad=(1, 1)))
    assert not t.applicable(m.g.nodes[0], CUDA)  # a float conv: triton.conv's
    assert not registry.get("triton.conv").applicable(node, CUDA)


def test_the_tma_form_takes_stride_1_convs_and_picks_the_patch_that_wastes_least() -> None:
    """The TMA form reads each tap's input as one rectangular block of the output patch (stride 1, undilated,
    16-byte channel rows); the patch shape follows the output: 56x56 -> 8x16 (8 of 64 columns past the edge; 2x64
    wastes as much but is flatter), 28x28 -> 4x32, 7x7 -> 8x16."""
    from kiln.kernels.conv.triton_conv import INT8_TILES, patch_shape
    from kiln.utils.errors import UnsupportedError
    from tests.kernels.conv.int8_cases import quantized

    assert patch_shape(128, 56, 56) == (8, 16)
    assert patch_shape(128, 28, 28) == (4, 32)
    assert patch_shape(128, 7, 7) == (8, 16)
    t = registry.get("triton.int8_conv")
    tma = next(name for name, tile in INT8_TILES.items() if tile.tma)
    strided, _ = quantized((1, 16, 9, 9), 8, 3, stride=(2, 2), pad=(1, 1))
    with pytest.raises(UnsupportedError, match="stride"):
        t.build(strided, {"tile": tma}, torch.device("cuda"))
    narrow, _ = quantized((1, 8, 9, 9), 8, 3, pad=(1, 1))  # 8 int8 channels: 8-byte rows
    with pytest.raises(UnsupportedError, match="16-byte"):
        t.build(narrow, {"tile": tma}, torch.device("cuda"))


def test_float8_convs_take_the_fp8_template_and_the_1x1_gemm_path() -> None:
    """`triton.fp8_conv` takes float8 conv layers (per-output-channel weight scales), `triton.int8_conv` the int8
    ones; a 1x1 stride-1 float8 conv also goes to `triton.fp8_gemm`. The float8 source sums in float32 with
    partial sums every 128 products, dequantizes per channel and, requantizing, stores float8. Numbers: GPU tier
    (tests/kernels/conv/test_gpu.py), the interpreter's float8 conversion being wrong."""
    from kiln.ir import DType
    from kiln.kernels.conv.triton_conv import quantized_spec, source
    from tests.kernels.conv.int8_cases import quantized

    f8, _ = quantized((1, 32, 6, 6), 16, 3, pad=(1, 1), requant=True, half=True, fp8=True)
    i8, _ = quantized((1, 32, 6, 6), 16, 3, pad=(1, 1), requant=True, half=True)
    t8, ti = registry.get("triton.fp8_conv"), registry.get("triton.int8_conv")
    assert t8.applicable(f8, CUDA) and not t8.applicable(i8, CUDA) and ti.applicable(i8, CUDA)
    assert not ti.applicable(f8, CUDA) and not t8.applicable(f8, torch.device("cpu"))
    s = quantized_spec(f8, DType.FLOAT8_E4M3FN)
    assert s is not None and s.out is DType.FLOAT8_E4M3FN and s.dq is not None
    text = source(s)
    assert "max_num_imprecise_acc=BLOCK_K" in text and "int32" not in text and "tl.float8e4nv" in text
    assert text.index("dq_ptr + offs_n") < text.index("tl.store")
    one, _ = quantized((1, 32, 6, 6), 16, 1, half=True, fp8=True)
    assert registry.get("triton.fp8_gemm").applicable(one, CUDA) and not registry.get("triton.int8_gemm").applicable(
        one, CUDA)
