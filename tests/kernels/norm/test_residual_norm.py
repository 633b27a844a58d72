"""`triton.residual_norm`: a "residual_norm" Fused node (the residual Add, then the LayerNorm/RMSNorm of the sum) as
one norm kernel that loads both addends - against the node's reference under Triton's CPU interpreter (float32 and
float16; bfloat16 and real row counts on the GPU tier), with the tuner's check and a stricter one (the sum rounded
where the Add rounds it)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType
from kiln.kernels import registry
from kiln.kernels.norm.layernorm import residual_norm_view
from tests.kernels.interpreted import case_result, run_cases
from tests.kernels.norm.residual_cases import CASES, GPU_CASES, residual_norm

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.norm.residual_cases", tmp_path_factory.mktemp("resnorm"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert len(problems) == 4 and all(p is None for p in problems.values()), problems


def test_takes_residual_norm_nodes_on_cuda_only() -> None:
    t = registry.get("triton.residual_norm")
    assert t.priority < registry.get("reference").priority
    for make in (*CASES.values(), *GPU_CASES.values()):
        node, _ = make()
        assert t.applicable(node, CUDA) and not t.applicable(node, CPU)
    node, _ = residual_norm(4, 64, torch.float16, keep_sum=True)
    view = residual_norm_view(node)
    assert view is not None and view.keep_sum and view.b_at is not None
    assert [node.inputs[view.a_at].name, node.inputs[view.r_at].name] == ["a", "r"]  # type: ignore[union-attr]


def test_refuses_what_the_kernel_cannot_compute() -> None:
    t = registry.get("triton.residual_norm")
    node, _ = residual_norm(4, 64, torch.float32)
    node.attrs["body"].nodes[1].attrs["stash_type"] = DType.FLOAT16  # the norm rules of triton.layernorm apply
    assert not t.applicable(node, CUDA)
    node, _ = residual_norm(4, 64, torch.float32)
    body = node.attrs["body"]
    add = body.nodes[0]
    add.inputs = [add.inputs[0], add.inputs[0]]  # an Add reading one operand twice is still the kernel's
    assert t.applicable(node, CUDA)
    node, _ = residual_norm(4, 64, torch.float32)
    node.attrs["body"].nodes[0].op = "Sub"  # not a sum
    assert residual_norm_view(node) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", [*CASES, *GPU_CASES])
def test_on_cuda(name: str) -> None:
    from tests.kernels.norm.residual_cases import run_case

    problems = run_case(name, "cuda")
    assert len(problems) == 4 and all(p is None for p in problems.values()), problems
