"""`triton.norm_quantize`: a "quantizing" Fused node (a LayerNorm/RMSNorm and the QuantizeLinear of its result) as one
kernel writing the 8-bit values (and the float result when the node outputs it), or, as the space's other choice,
the norm kernel then the quantize's own kernel - against the node's reference under Triton's CPU interpreter
(int8/uint8; float8 on the GPU tier: the interpreter's float8 conversion is wrong)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType
from kiln.kernels import registry
from kiln.kernels.norm.layernorm import norm_quantize_view
from tests.kernels.interpreted import case_result, run_cases
from tests.kernels.norm.quantize_cases import CASES, FP8_CASES, norm_quantize

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.norm.quantize_cases", tmp_path_factory.mktemp("normq"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert len(problems) == 4 and all(p is None for p in problems.values()), problems


def test_takes_norm_nodes_on_cuda_with_a_fused_and_a_separate_choice() -> None:
    t = registry.get("triton.norm_quantize")
    assert t.space["quantize"] == ["fused", "separate"] and t.priority < registry.get("reference").priority
    from kiln.tune.tuner import SMALL_SPACE

    assert len(t.configs()) <= SMALL_SPACE  # the default level times every config, the separate ones included
    for make in (*CASES.values(), *FP8_CASES.values()):
        node, _ = make()
        assert t.applicable(node, CUDA) and not t.applicable(node, CPU)
    node, _ = norm_quantize(4, 64, torch.float16, DType.INT8, keep_y=False)
    view = norm_quantize_view(node)
    assert view is not None and not view.keep_y and view.scale == pytest.approx(3.0 / 127, rel=1e-3)


def test_refuses_what_the_kernel_cannot_write() -> None:
    node, _ = norm_quantize(4, 64, torch.float32, DType.INT8)
    body = node.attrs["body"]
    q = body.nodes[1]
    scale = node.inputs[body.inputs.index(q.inputs[1])]
    assert scale is not None and isinstance(scale.data, torch.Tensor)
    scale.data = -scale.data  # a negative scale: not a quantize the kernels (or the pass) take
    assert norm_quantize_view(node) is None
    scale.data = torch.tensor(1e-39)  # subnormal: its float32 reciprocal overflows, which km.quotient cannot use
    assert norm_quantize_view(node) is None
    scale.data = torch.tensor(3e-38)  # the smallest normal scales still have a finite reciprocal
    assert norm_quantize_view(node) is not None
    node, _ = norm_quantize(4, 64, torch.float32, DType.INT8)
    node.attrs["body"].nodes[0].attrs["stash_type"] = DType.FLOAT16  # the norm rules of triton.layernorm apply
    assert not registry.get("triton.norm_quantize").applicable(node, CUDA)
