"""`triton.stem_conv`: every case of `stem_cases.py` under the Triton CPU interpreter against the op table's
reference (in one subprocess), and its applicability."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.kernels import registry
from kiln.kernels.conv.triton_stem import MAX_C, TILES
from tests.kernels.conv.cases import CUDA, F16, conv_relu
from tests.kernels.conv.stem_cases import ALL, CASES
from tests.kernels.interpreted import case_result, run_cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.conv.stem_cases", tmp_path_factory.mktemp("stem"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and all(p is None for p in problems.values()), problems


def test_the_cases_cover_every_tile() -> None:
    assert set(ALL) == set(TILES) and {t for make in CASES.values() for t in make().tiles} == set(TILES)


def test_taken_for_few_input_channels_on_cuda_only() -> None:
    t = registry.get("triton.stem_conv")
    few = conv_relu(F16, (1, MAX_C, 8, 8), 16, (3, 3), ALL, cl=True, pad=(1, 1)).node
    many = conv_relu(F16, (1, MAX_C + 1, 8, 8), 16, (3, 3), ALL, cl=True, pad=(1, 1)).node
    assert t.applicable(few, CUDA) and not t.applicable(many, CUDA)
    assert not t.applicable(few, torch.device("cpu"))
    names = [c.name for c in registry.candidates(few, CUDA)]
    assert "triton.stem_conv" in names and names.index("cuda.conv") < names.index("triton.stem_conv")
