"""`triton.gather` on a real GPU: every interpreter case, BERT-base's word-embedding lookup at batch 128, and a
CUDA graph capture (the out-of-range flag set inside a replay is raised after it)."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import registry
from tests.kernels.tensor import gather_cases as g

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


@pytest.mark.parametrize("name", list(g.CASES))
def test_case_on_cuda(name: str) -> None:
    problems = g.run_case(name, "cuda")
    assert problems and all(p is None for p in problems.values()), problems


def test_bert_word_embeddings_every_config() -> None:
    table = torch.randn(30522, 768, dtype=torch.float16)
    ids = torch.randint(0, 30522, (128, 128))
    problems = g._run(table, ids, device="cuda")
    assert all(p is None for p in problems.values()), problems


def test_replays_in_a_cuda_graph_and_flags_a_bad_id_there() -> None:
    table = torch.randn(100, 64, device="cuda")
    ids = torch.randint(0, 100, (4, 16), device="cuda")
    node = g._node(table, ids, 0)
    kernel = registry.get("triton.gather").build(node, {"BLOCK": 256}, g.CUDA)
    (check,) = kernel.checks  # type: ignore[attr-defined]
    eager = kernel([table, ids])[0]  # compiles (and makes the flag) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel([table, ids])[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager) and torch.equal(eager, table[ids]) and check.raised() is None
    ids[0, 0] = 100
    graph.replay()
    torch.cuda.synchronize()
    assert check.raised() is not None and torch.equal(captured[0, 0], table[99])
