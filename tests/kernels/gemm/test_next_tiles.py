"""The GEMM tiles under evaluation (sliced epilogues, persistent programs) under the Triton CPU interpreter (every
case of `next_cases.py`, in one subprocess), and what needs no kernel run: the source's forms, the spaces, opt-in."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.ir import DType
from kiln.kernels import registry
from kiln.kernels.gemm.triton_gemm import render, spec
from tests.kernels.gemm import cases as f
from tests.kernels.gemm.next_cases import CASES, FLOAT
from tests.kernels.interpreted import case_result, run_cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.gemm.next_cases", tmp_path_factory.mktemp("next"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and all(p is None for p in problems.values()), problems


def _spec() -> Any:
    s = spec(f.bias_gelu_residual(DType.FLOAT16, "none", FLOAT).node)
    assert s is not None
    return s


def test_the_persistent_source_is_the_same_body_in_a_tile_loop() -> None:
    plain, looped = render(_spec(), False, tma=True), render(_spec(), False, tma=True, persistent=True)
    assert "tl.num_programs(0), flatten=True" in looped and "tl.num_programs" not in plain
    body = plain.split("    pid = tl.program_id(0)\n")[1]
    assert "".join(f"    {line}" if line.strip() else line for line in body.splitlines(True)) in looped


@pytest.mark.parametrize("parts", [2, 4])
def test_a_sliced_epilogue_runs_once_per_slice_with_its_columns(parts: int) -> None:
    src = render(_spec(), False, tma=True, subtile=parts)
    assert src.count("tl.store(out_ptr") == parts and src.count("tl.split(") == parts - 1
    for j in range(parts):
        assert f"    acc = acc_{j}\n    offs_n = pid_n * BLOCK_N + {j} * (BLOCK_N // {parts})" in src
    with pytest.raises(ValueError, match="2 or 4"):
        render(_spec(), False, subtile=3)


def test_the_tiles_under_evaluation_are_opt_in() -> None:
    for name in ("triton.gemm_next", "triton.int8_gemm_next", "triton.int8_conv_next", "triton.fp8_gemm_next"):
        t = registry.get(name)
        tiles = [registry.get(name).tiles[c["tile"]] for c in t.configs()]  # type: ignore[attr-defined]
        assert t.min_opt_level == 4 and all(x.persistent or x.subtile > 1 for x in tiles)


def test_the_float8_tiles_under_evaluation_promote_once_a_k_step() -> None:
    """Float8 sums are promoted to float32 at most once per K step: its tiles need a step of FP8_PROMOTE or more."""
    from kiln.kernels.gemm.triton_gemm import FP8_NEXT_TILES, FP8_PROMOTE

    assert FP8_NEXT_TILES and all(t.block_k >= FP8_PROMOTE and t.tma for t in FP8_NEXT_TILES.values())
    assert registry.get("triton.fp8_gemm_next").priority > registry.get("triton.fp8_gemm").priority
