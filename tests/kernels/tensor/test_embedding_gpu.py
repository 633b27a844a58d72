"""The "embedding" node's tactics on a real GPU: every interpreter case, BERT-base's embeddings at batch 128 (both
tactics against the reference), and a CUDA graph capture (an out-of-range id flagged inside a replay)."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import registry
from tests.kernels.tensor import embedding_cases as e

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


@pytest.mark.parametrize("name", list(e.CASES))
def test_case_on_cuda(name: str) -> None:
    problems = e.run_case(name, "cuda")
    assert problems and all(p is None for p in problems.values()), problems


def test_bert_base_at_batch_128() -> None:
    node, args = e.bert(torch.float16, (128, 128), 768, vocab=30522)
    problems = e.run(node, args, "cuda")
    assert all(p is None for p in problems.values()), problems


def test_replays_in_a_cuda_graph_and_flags_a_bad_id_there() -> None:
    node, args = e.bert(torch.float16, (2, 16), 64)
    args = [a.cuda() for a in args]
    kernel = registry.get("triton.embedding").build(node, {}, e.CUDA)
    eager = kernel(args)[0]  # compiles (and makes the flags) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel(args)[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager) and all(c.raised() is None for c in kernel.checks)  # type: ignore[attr-defined]
    body = node.attrs["body"]
    at = body.inputs.index(next(n for n in body.nodes if n.name == "word_lookup").inputs[1])
    args[at][0, 0] = 10**6
    graph.replay()
    torch.cuda.synchronize()
    said = [c.raised() for c in kernel.checks]  # type: ignore[attr-defined]
    assert said[0] is not None and "word_lookup" in said[0] and said[1] is None
