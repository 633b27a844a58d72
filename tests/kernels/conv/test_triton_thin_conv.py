"""`triton.thin_conv`: every case of `thin_cases.py` under the Triton CPU interpreter against the op table's
reference (one subprocess), plus what the tactic takes and refuses."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.kernels import registry
from kiln.kernels.conv.triton_conv import THIN_MAX_C, THIN_TILES, thin_tiles
from tests.kernels.conv.cases import CUDA, F16, F32, bare, conv_relu
from tests.kernels.conv.thin_cases import CASES
from tests.kernels.interpreted import case_result, run_cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.conv.thin_cases", tmp_path_factory.mktemp("thin"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and all(p is None for p in problems.values()), problems


def test_the_cases_cover_the_space() -> None:
    assert {t for make in CASES.values() for t in make().tiles} == set(THIN_TILES)
    assert all(t.tma for t in THIN_TILES.values())


def test_takes_thin_pointwise_convs_on_cuda_only() -> None:
    node = conv_relu(F16, (1, 24, 7, 7), 72, (1, 1), (), cl=True).node
    t = registry.get("triton.thin_conv")
    assert t.applicable(node, CUDA)
    assert "triton.thin_conv" in [c.name for c in registry.candidates(node, CUDA)]
    assert not t.applicable(node, torch.device("cpu"))


@pytest.mark.parametrize(("make", "why"), [
    (lambda: conv_relu(F16, (1, 24, 7, 7), 240, (3, 3), (), cl=True, pad=(1, 1)), "3x3"),
    (lambda: conv_relu(F16, (1, 24, 8, 8), 240, (1, 1), (), cl=True, stride=(2, 2)), "stride 2"),
    (lambda: bare(F16, (1, THIN_MAX_C + 16, 7, 7), 240, (1, 1), (), cl=True), "too many input channels"),
    (lambda: bare(F16, (1, 24, 1, 1), 240, (1, 1), (), cl=True), "a 1x1 image (squeeze-excitation)"),
    (lambda: bare(F16, (1, 12, 7, 7), 240, (1, 1), (), cl=True), "24-byte input rows"),
    (lambda: bare(F32, (1, 16, 7, 7), 240, (1, 1), (), cl=True), "float32"),
], ids=["3x3", "stride2", "wide-input", "one-pixel", "unaligned-rows", "float32"])
def test_refuses_other_convs(make: Any, why: str) -> None:
    assert not registry.get("triton.thin_conv").applicable(make().node, CUDA), why


def test_refuses_an_image_size_unknown_at_build_time() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT16, (1, 24, "h", "w")))
    w = g.add_initializer("w", torch.ones(64, 24, 1, 1, dtype=torch.float16))
    g.outputs.append(g.add("Conv", [x, w], name="conv")[0])
    assert not registry.get("triton.thin_conv").applicable(g.nodes[0], CUDA)


@pytest.mark.parametrize(("n", "tiles"), [
    (16, ["tma-128x16x32-w4s4"]), (24, ["tma-128x32x64-w4s4"]), (40, ["tma-128x64x32-w4s4"]),
    (72, ["tma-128x128x64-w4s3"]), (128, ["tma-128x128x64-w4s3"]),
    (240, ["tma-128x64x32-w4s4", "tma-128x128x64-w4s3"]),
])
def test_each_layer_is_timed_on_the_tiles_that_fit_its_width(n: int, tiles: list[str]) -> None:
    """One tile as wide as a narrow layer's output (its input read once), two for a wide one - the tuner times
    `node_configs`, the timing cache accepts any tile of the space."""
    assert thin_tiles(n) == tiles
    node = conv_relu(F16, (1, 24, 7, 7), n, (1, 1), (), cl=True).node
    t = registry.get("triton.thin_conv")
    assert t.node_configs(node) == [{"tile": name} for name in tiles]
    assert all(c in t.configs() for c in t.node_configs(node))
