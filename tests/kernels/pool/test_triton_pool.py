"""`triton.maxpool`: every case under the Triton CPU interpreter (one subprocess) against the op table's reference
(a max is exact, so results must be equal), applicability, and on a GPU ResNet-50's stem pool."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType
from kiln.kernels import registry
from kiln.utils.errors import UnsupportedError
from tests.kernels.interpreted import case_result, run_cases
from tests.kernels.pool.cases import ALL, CASES, CUDA, maxpool, run


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.pool.cases", tmp_path_factory.mktemp("pool"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and all(p is None for p in problems.values()), problems


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], ceil_mode=1), dict(kernel_shape=[3, 3], pads=[0, 0, 1, 1]),
    dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
], ids=["ceil-mode", "asymmetric-pads", "auto-pad-same"])
def test_refuses_what_torch_keeps(attrs: dict[str, Any]) -> None:
    node, _ = maxpool((1, 8, 9, 9), DType.FLOAT16, **attrs)
    assert not registry.get("triton.maxpool").applicable(node, CUDA)


def test_an_nchw_input_is_refused_when_called() -> None:
    node, x = maxpool((1, 8, 9, 9), DType.FLOAT16, kernel_shape=[2, 2])
    assert registry.get("triton.maxpool").applicable(node, CUDA)
    assert not registry.get("triton.maxpool").applicable(node, torch.device("cpu"))
    with pytest.raises(UnsupportedError, match="channels-last"):
        registry.get("triton.maxpool").build(node, {}, CUDA)([x.contiguous()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [128, 1])
def test_resnet50_stem_pool_on_the_gpu(batch: int) -> None:
    node, x = maxpool((batch, 64, 112, 112), DType.FLOAT16, kernel_shape=[3, 3], strides=[2, 2],
                      pads=[1, 1, 1, 1])
    problems = run(node, x, ALL, "cuda")
    assert all(p is None for p in problems.values()), problems
