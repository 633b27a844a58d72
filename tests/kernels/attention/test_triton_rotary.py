"""`triton.rotary`: every case under the Triton CPU interpreter (one subprocess) against the op table's reference
in float64, what it refuses, and on a GPU LLaMA-like shapes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType
from kiln.kernels import registry
from tests.kernels.attention.rotary_cases import ALL, CASES, CUDA, OUT_OF_RANGE, rotary, run
from tests.kernels.interpreted import case_result, run_cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.attention.rotary_cases", tmp_path_factory.mktemp("rotary"))


@pytest.mark.parametrize("name", [n for n in CASES if n != OUT_OF_RANGE])
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and set(problems) == set(ALL) and all(p is None for p in problems.values()), problems


def test_applicable_on_cuda_only_with_tables_or_position_ids() -> None:
    tactic = registry.get("triton.rotary")
    for node, _ in (rotary((2, 5, 64), DType.FLOAT16, 4, 1), rotary((2, 5, 64), DType.FLOAT16, 4, 1, positions=9)):
        assert tactic.applicable(node, CUDA) and not tactic.applicable(node, torch.device("cpu"))


def test_an_out_of_range_position_raises_after_the_run(interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, OUT_OF_RANGE)
    assert problems == {"check": None}, problems


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,heads,table,rotated,interleaved,positions", [
    ((1, 128, 32 * 128), 32, 1, 0, False, 0), ((8, 512, 8 * 128), 8, 1, 0, False, 0),
    ((4, 32, 300, 64), 32, 4, 0, False, 0),
    ((4, 256, 32 * 80), 32, 1, 32, False, 0),  # Phi-2: 32 of 80 dims rotated
    ((2, 16, 128, 256), 16, 1, 64, True, 0),  # GPT-J: 64 of 256, interleaved
    ((4, 512, 32 * 128), 32, 4, 0, False, 4096),  # onnxruntime's form: a 4096-position cache, ids per sequence
])
def test_llm_shapes_on_the_gpu(shape: tuple[int, ...], heads: int, table: int, rotated: int,
                               interleaved: bool, positions: int) -> None:
    node, xs = rotary(shape, DType.FLOAT16, heads, table, rotated, interleaved, positions)
    problems = run(node, xs, ALL, "cuda")
    assert all(p is None for p in problems.values()), problems
