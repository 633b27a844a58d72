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
