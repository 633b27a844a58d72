"""`triton.norm_gemm` and `split.norm_gemm` (a "normalized" node: LayerNorm/RMSNorm + the GEMM reading it): every
case of `norm_cases.py` under the Triton CPU interpreter against the op table's reference (in one subprocess), plus
the spaces, applicability and ranking."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from kiln.kernels import registry
from kiln.kernels.gemm.norm_gemm import GEMMS, NORM_TILES, NORM_TMA_TILES, normalized_spec
from kiln.kernels.gemm.triton_gemm import TILES, render
from tests.kernels.gemm.cases import CUDA, F16
from tests.kernels.gemm.norm_cases import CASES, EVERY, ln_bias_gelu, ln_kept_residual
from tests.kernels.interpreted import case_result, run_cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.gemm.norm_cases", tmp_path_factory.mktemp("norm_gemm"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and all(p is None for p in problems.values()), problems
    assert any(k.startswith("triton.norm_gemm") for k in problems) and any(k.startswith("split") for k in problems)


def test_the_cases_cover_the_space() -> None:
    assert set(EVERY) == set(NORM_TILES) and all(not t.tma for t in NORM_TILES.values())
    split = registry.get("split.norm_gemm").configs()
    assert split[0] == {"gemm": "cuda.linear/kn"} and GEMMS["cuda.linear/kn"] == ("cuda.linear", {"lt_epilogue": True,
                                                                                                "weight": "kn"})
    linear = registry.get("cuda.linear").configs()
    assert [GEMMS[c["gemm"]][1] for c in split[:4]] == linear and linear[0] == {"lt_epilogue": True, "weight": "kn"}
    assert {c["gemm"] for c in split[4:]} == {f"triton.gemm/{t}" for t in TILES}
    assert len(split) <= 16  # the default level times the split's space whole (the fused tactic is opt-in)
    fused = registry.get("triton.norm_gemm")
    assert fused.min_opt_level == 4 and {c["stats"] for c in fused.configs()} == {"loop", "before", "after"}
    tma = registry.get("triton.norm_gemm_tma")  # its statistics always from the loaded tiles
    assert tma.min_opt_level == 4 and all(set(c) == {"tile"} for c in tma.configs())
    assert all(t.tma for t in NORM_TMA_TILES.values()) and len(tma.configs()) == len(NORM_TMA_TILES)


def test_split_ranks_first_and_both_run_on_cuda_only() -> None:
    node = ln_bias_gelu(F16, EVERY).node
    names = [t.name for t in registry.candidates(node, CUDA)]
    assert names.index("split.norm_gemm") < names.index("triton.norm_gemm") < names.index("reference")
    assert {t.name for t in registry.candidates(node, torch.device("cpu"))} == {"reference"}


def test_the_source_folds_the_norm_and_writes_kept_rows_from_the_first_column_only() -> None:
    plain = render(normalized_spec(ln_bias_gelu(F16, EVERY).node), tf32=False)  # type: ignore[arg-type]
    assert "m2 / K" in plain and "nc_ptr" in plain and "nd_ptr" in plain and "y_ptr" not in plain
    assert "x = tl.load(x_ptrs)" in plain  # the main loop is the plain GEMM's, on the raw rows
    kept = render(normalized_spec(ln_kept_residual(F16, EVERY).node), tf32=False)  # type: ignore[arg-type]
    assert "tl.store(y_ptr" in kept and "if pid_n == 0:" in kept


def test_the_statistics_go_before_after_or_into_the_main_loop() -> None:
    s = normalized_spec(ln_kept_residual(F16, EVERY).node)
    assert s is not None and s.norm is not None
    for where in ("before", "after", "loop"):
        src = render(dataclasses.replace(s, norm=dataclasses.replace(s.norm, stats=where)), tf32=False)
        loop, stats, kept = src.index("acc = tl.dot"), src.index("m2 / K"), src.index("tl.store(y_ptr")
        assert (loop < stats) == (where != "before") and stats < kept
        # in the loop: merged from the tile the product reads, no pass of their own over the rows
        assert ("st_x = x.to(tl.float32)" in src) == (where == "loop")
        assert (src.count("x = tl.load(x_rows") == 1) == (where == "loop")  # the kept rows' pass only
    loop = dataclasses.replace(s, norm=dataclasses.replace(s.norm, stats="loop"))
    src = render(loop, tf32=False, tma=True)  # a TMA tile: the same statistics from the tiles it loads
    assert "x = x_desc.load(" in src and "st_x = x.to(tl.float32)" in src and "x_desc, w_desc, x_ptr," in src
    with pytest.raises(AssertionError, match="TMA"):
        render(dataclasses.replace(s, norm=dataclasses.replace(s.norm, stats="before")), tf32=False, tma=True)
    rms = normalized_spec(CASES["rms-bare-m1-f16"]().node)
    assert rms is not None and rms.norm is not None
    src = render(dataclasses.replace(rms, norm=dataclasses.replace(rms.norm, stats="loop")), tf32=False)
    assert "total += tl.sum(st_x * st_x, axis=1)" in src and "x = tl.load(x_rows" not in src  # no kept rows
