"""The "embedding" node's tactics under the Triton CPU interpreter (every case of `embedding_cases.py`, in one
subprocess), and what needs no kernel: which nodes they take."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.kernels import registry
from kiln.kernels.tensor.embedding import embedding_spec
from tests.kernels.interpreted import case_result, run_cases
from tests.kernels.tensor import embedding_cases as e


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.tensor.embedding_cases", tmp_path_factory.mktemp("embedding"))


@pytest.mark.parametrize("name", list(e.CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and set(problems) == set(e.TACTICS) and all(p is None for p in problems.values()), problems


def test_the_spec_reads_the_lookups_terms_and_norm() -> None:
    node, _ = e.bert(torch.float32, (2, 3), 16)
    s = embedding_spec(node)
    assert s is not None and [name for _, _, name in s.lookups] == ["word_lookup", "type_lookup"]
    assert len(s.terms) == 1 and s.b_at is not None and s.eps == 1e-12
    fused, split = registry.get("triton.embedding"), registry.get("split.embedding")
    assert fused.applicable(node, e.CUDA) and split.applicable(node, e.CUDA)
    assert split.priority < fused.priority  # untimed builds keep the kernels the unfused graph ran
    assert not fused.applicable(node, torch.device("cpu"))
