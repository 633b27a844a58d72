"""`triton.flash_attention_quantize`: a "quantizing" Fused node (an Attention and the QuantizeLinear of its output)
as the flash kernel storing the 8-bit values (and the float output when the node has it), or the flash kernel then
the quantize's own kernel ("separate") - against the node's reference under Triton's CPU interpreter (int8/uint8;
float8 on the GPU tier)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType
from kiln.kernels import registry
from tests.kernels.attention.quantize_cases import CASES, FP8_CASES, attention_quantize
from tests.kernels.interpreted import case_result, run_cases

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.attention.quantize_cases", tmp_path_factory.mktemp("attq"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert len(problems) == 4 and all(p is None for p in problems.values()), problems


def test_takes_quantizing_attentions_on_cuda_at_every_level() -> None:
    """Applies wherever triton.flash_attention takes the attention, at every optimization level (the fused node
    has no other kernel but the reference), with the separate form in the timed space."""
    from kiln.tune.tuner import SMALL_SPACE

    t = registry.get("triton.flash_attention_quantize")
    assert t.min_opt_level == 0 and len(t.configs()) <= SMALL_SPACE
    assert {c["quantize"] for c in t.configs()} == {"fused", "separate"}
    for make in (*CASES.values(), *FP8_CASES.values()):
        node, _ = make()
        assert t.applicable(node, CUDA) and not t.applicable(node, CPU)
    node, _ = attention_quantize(1, 8, 2, 16, torch.float32, DType.INT8)
    node.attrs["body"].nodes[0].attrs["left_window_size"] = 4  # what the flash kernel leaves to other tactics
    assert not t.applicable(node, CUDA)


def test_sdpa_then_quantize_is_the_tuners_other_choice() -> None:
    """`cuda.sdpa_quantize` takes the same quantizing attentions where torch's attention does (not a softcap, not
    on the CPU), times the three fast backends, and ranks after the one-kernel Triton form for untimed builds.
    Its numbers are checked on the GPU (`test_triton_flash_gpu.py`)."""
    t, flash = registry.get("cuda.sdpa_quantize"), registry.get("triton.flash_attention_quantize")
    assert [c["backend"] for c in t.configs()] == ["flash", "efficient", "cudnn"]
    assert t.priority > flash.priority
    for make in (*CASES.values(), *FP8_CASES.values()):
        node, _ = make()
        assert t.applicable(node, CUDA) and not t.applicable(node, CPU)
    node, _ = attention_quantize(1, 8, 2, 16, torch.float32, DType.INT8)
    node.attrs["body"].nodes[0].attrs["softcap"] = 5.0
    assert not t.applicable(node, CUDA)
    plain, _ = attention_quantize(1, 8, 2, 16, torch.float32, DType.INT8)
    plain.attrs["kind"] = "pointwise"  # not a quantizing node
    assert not t.applicable(plain, CUDA)
