"""`triton.depthwise`: every case of `depthwise_cases.py` under the Triton CPU interpreter against the op table's
reference (one subprocess), plus the space and applicability."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.kernels import registry
from kiln.kernels.conv import triton_conv
from kiln.kernels.conv.triton_depthwise import TILES
from kiln.utils.errors import UnsupportedError
from tests.kernels.conv.cases import CUDA, F16, inputs
from tests.kernels.conv.depthwise_cases import ALL, CASES, dw
from tests.kernels.interpreted import case_result, run_cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.conv.depthwise_cases", tmp_path_factory.mktemp("depthwise"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and all(p is None for p in problems.values()), problems


def test_the_cases_cover_the_space() -> None:
    cases = [make() for make in CASES.values()]
    assert set(ALL) == set(TILES) and {t for c in cases for t in c.tiles} == set(TILES)
    assert all(triton_conv.channels_last(c.feeds["x"]) for c in cases)
    assert {c.feeds["x"].dtype for c in cases} == {torch.float32, torch.float16}


def test_an_nchw_input_is_refused_before_any_compile() -> None:
    case = dw(F16, (1, 8, 7, 7), (3, 3), ALL, pad=(1, 1))
    kernel = registry.get("triton.depthwise").build(case.node, {"tile": ALL[0]}, CUDA)
    with pytest.raises(UnsupportedError, match="channels-last"):
        kernel(inputs(case.node, case.feeds))
    assert all(t.block_n & (t.block_n - 1) == 0 and t.block_m & (t.block_m - 1) == 0 for t in TILES.values())


def _conv_node(x: tuple[int, ...], w: tuple[int, ...], attrs: dict[str, Any]) -> Node:
    g = Graph()
    xi = g.add_input("x", TensorType(DType.FLOAT16, x))
    wi = g.add_initializer("w", torch.ones(w, dtype=torch.float16))
    g.outputs.append(g.add("Conv", [xi, wi], attrs, name="conv")[0])
    return g.nodes[0]


def test_applicable_to_depthwise_convs_on_cuda_only() -> None:
    node = dw(F16, (1, 8, 7, 7), (3, 3), ALL, cl=True, pad=(1, 1)).node
    t = registry.get("triton.depthwise")
    assert t.applicable(node, CUDA) and not t.applicable(node, torch.device("cpu"))
    assert not registry.get("triton.conv").applicable(node, CUDA)
    names = [c.name for c in registry.candidates(node, CUDA)]
    assert names.index("cuda.conv") < names.index("triton.depthwise")  # cuDNN first at optimization level 0


@pytest.mark.parametrize(("x", "w", "attrs"), [
    ((1, 8, 7, 7), (8, 2, 3, 3), {"group": 4, "pads": (1, 1, 1, 1)}),  # grouped, not depthwise
    ((1, 8, 7, 7), (16, 1, 3, 3), {"group": 8, "pads": (1, 1, 1, 1)}),  # a channel multiplier of 2
    ((1, 4, 7, 7), (6, 4, 3, 3), {}),  # ungrouped (triton.conv's)
    ((1, 8, 7, 7), (8, 1, 3, 3), {"group": 8, "pads": (0, 0, 1, 1)}),  # asymmetric padding
    ((1, 8, 9), (8, 1, 3), {"group": 8}),  # 1-D
], ids=["grouped", "multiplier-2", "ungrouped", "asymmetric-pads", "conv1d"])
def test_refuses_other_convs(x: tuple[int, ...], w: tuple[int, ...], attrs: dict[str, Any]) -> None:
    assert not registry.get("triton.depthwise").applicable(_conv_node(x, w, attrs), CUDA)
