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
