"""`triton.global_avgpool`: every case under the Triton CPU interpreter (one subprocess) against the op table's
reference in float64, what it refuses, and on a GPU MobileNetV3's squeeze-and-excitation pools."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.kernels import registry
from tests.kernels.interpreted import case_result, run_cases
from tests.kernels.pool.global_cases import ALL, CASES, CUDA, gap, run


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.pool.global_cases", tmp_path_factory.mktemp("gap"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and set(problems) == set(ALL) and all(p is None for p in problems.values()), problems


def test_refuses_other_ranks_and_types_and_ranks_after_torch() -> None:
    tactic = registry.get("triton.global_avgpool")
    node, _ = gap((1, 8, 4, 4), DType.FLOAT16, False)
    assert tactic.applicable(node, CUDA) and not tactic.applicable(node, torch.device("cpu"))
    for shape, dt in (((1, 8, 16), DType.FLOAT16), ((1, 8, 2, 2, 2), DType.FLOAT32), ((1, 8, 4, 4), DType.FLOAT64)):
        g = Graph()
        v = g.add_input("x", TensorType(dt, shape))
        g.add("GlobalAveragePool", [v], {}, name="pool", outputs=1)
        assert not tactic.applicable(g.nodes[0], CUDA), (shape, dt)
    names = [t.name for t in registry.candidates(node, CUDA)]
    assert names.index("cuda.pool") < names.index("triton.global_avgpool")  # untimed builds keep torch's mean


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,channels_last", [((1, 960, 7, 7), True), ((1, 72, 28, 28), False),
                                                 ((128, 672, 14, 14), True), ((4, 3, 224, 224), False)])
def test_mobilenet_pools_on_the_gpu(shape: tuple[int, int, int, int], channels_last: bool) -> None:
    node, x = gap(shape, DType.FLOAT16, channels_last)
    problems = run(node, x, ALL, "cuda")
    assert all(p is None for p in problems.values()), problems
