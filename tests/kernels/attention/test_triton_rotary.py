"""`triton.rotary`: every case under the Triton CPU interpreter (one subprocess) against the op table's reference
in float64, what it refuses, and on a GPU LLaMA-like shapes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.kernels import registry
from tests.kernels.attention.rotary_cases import ALL, CASES, CUDA, rotary, run
from tests.kernels.interpreted import case_result, run_cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.attention.rotary_cases", tmp_path_factory.mktemp("rotary"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and set(problems) == set(ALL) and all(p is None for p in problems.values()), problems


def test_refuses_what_it_does_not_render() -> None:
    tactic = registry.get("triton.rotary")
    node, _ = rotary((2, 5, 64), DType.FLOAT16, 4, 1)
    assert tactic.applicable(node, CUDA) and not tactic.applicable(node, torch.device("cpu"))
    for attrs in ({"positions": 1},):
        g = Graph()
        x = g.add_input("x", TensorType(DType.FLOAT16, (2, 5, 64)))
        if attrs.pop("positions", 0):  # tables [max positions, D/2] indexed by position ids
            t = g.add_input("t", TensorType(DType.FLOAT16, (32, 8)))
            ids = [g.add_input("pos", TensorType(DType.INT64, (2, 5)))]
        else:
            t, ids = g.add_input("t", TensorType(DType.FLOAT16, (1, 5, 8))), []
        g.add("RotaryEmbedding", [x, t, t, *ids], {"num_heads": 4, **attrs}, name="rope", outputs=1)
        assert not tactic.applicable(g.nodes[0], CUDA), attrs  # position ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,heads,table,rotated,interleaved", [
    ((1, 128, 32 * 128), 32, 1, 0, False), ((8, 512, 8 * 128), 8, 1, 0, False), ((4, 32, 300, 64), 32, 4, 0, False),
    ((4, 256, 32 * 80), 32, 1, 32, False),  # Phi-2: 32 of 80 dims rotated
    ((2, 16, 128, 256), 16, 1, 64, True),  # GPT-J: 64 of 256, interleaved
])
def test_llm_shapes_on_the_gpu(shape: tuple[int, ...], heads: int, table: int, rotated: int,
                               interleaved: bool) -> None:
    node, xs = rotary(shape, DType.FLOAT16, heads, table, rotated, interleaved)
    problems = run(node, xs, ALL, "cuda")
    assert all(p is None for p in problems.values()), problems
