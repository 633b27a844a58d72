"""`triton.gather` under the Triton CPU interpreter (every case of `gather_cases.py`, in one subprocess), and what
needs no kernel: which nodes it takes, that default builds time it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.kernels import registry
from tests.kernels.interpreted import case_result, run_cases
from tests.kernels.tensor import gather_cases as g


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.tensor.gather_cases", tmp_path_factory.mktemp("gather"))


@pytest.mark.parametrize("name", list(g.CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    configs = registry.get("triton.gather").configs()
    assert problems and set(problems) == {str(c) for c in configs} and all(p is None for p in problems.values()), \
        problems


def test_takes_integer_indices_on_gpus_only_and_is_timed_in_default_builds() -> None:
    t = registry.get("triton.gather")
    node = g._node(torch.randn(4, 3), torch.tensor([1, 2]), 0)
    assert t.applicable(node, g.CUDA) and not t.applicable(node, torch.device("cpu"))
    assert not t.applicable(g._node(torch.randn(4, 3), torch.tensor([1], dtype=torch.int16), 0), g.CUDA)
    assert t.min_opt_level == 0 and t.priority < registry.get("cuda.gather").priority
