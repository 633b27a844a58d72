"""The erf GELU of float16/bfloat16 layers (`km.gelu_narrow`) under the Triton interpreter: every float16 and
bfloat16 input against float64, float32 relative errors, special values; and that the generator uses it exactly
for narrow outputs. The same cases run on the GPU in `test_gpu.py`."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kiln.ir import DType
from kiln.kernels.pointwise.codegen import build_program
from tests.kernels.interpreted import case_result, run_cases
from tests.kernels.pointwise.cases import graph


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.pointwise.gelu_cases", tmp_path_factory.mktemp("gelu"), 1)


def check_exhaustive(r: dict[str, Any], dtype: str) -> None:
    """Bounds shared with the GPU test. float16: a handful of inputs off the correctly rounded GELU, by one step
    (the erf formula misses hundreds, all in the negative tail where 1 + erf cancels). bfloat16: the misses are
    the tail below -5.9 (values under 2e-9, kept by bfloat16's range, 0 here as in the formula), never more than
    the formula's."""
    if dtype == "float16":
        assert r["values"] == 63488 and r["fast_off"] <= 8 and r["formula_off"] > 300, r
        assert r["max_steps_off"] <= 1, r
    else:
        assert r["values"] == 65280 and r["fast_off"] <= r["formula_off"], r
        assert r["largest_off"] is not None and r["largest_off"] < -5.9, r


def check_float32(r: dict[str, Any]) -> None:
    assert r["max_rel_positive"] < 3e-7 and r["max_rel_negative"] < 6e-6, r


def check_specials(r: dict[str, Any]) -> None:
    got = [float(v) for v in r["got"]]
    assert got[0] == math.inf and math.isnan(got[1]) and math.isnan(got[2]), got  # as x * 0.5 * (1 + erf)
    assert got[3] == 0.0 and not r["signbits"][3] and got[4] == 0.0 and r["signbits"][4], got
    assert abs(got[5] - 5.9) < 1e-6 and -1.2e-8 < got[6] < -1e-8, got  # Phi(-5.9) = 1.82e-9, still computed
    assert got[7] == 6.0 and got[8] == 0.0 and got[9] == 100.0 and got[10] == 0.0, got  # past the tail
    assert got[11] == 3e38 or abs(got[11] / 3e38 - 1) < 1e-7, got
    assert got[12] == 0.0, got


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_narrow_value(dtype: str, interpreted: tuple[dict[str, Any], str]) -> None:
    check_exhaustive(case_result(interpreted, f"{dtype}-every-value"), dtype)


def test_float32_relative_error(interpreted: tuple[dict[str, Any], str]) -> None:
    check_float32(case_result(interpreted, "float32-relative-error"))


def test_special_values(interpreted: tuple[dict[str, Any], str]) -> None:
    check_specials(case_result(interpreted, "special-values"))


@pytest.mark.parametrize("dt,narrow", [(DType.FLOAT16, True), (DType.BFLOAT16, True), (DType.FLOAT32, False)])
def test_generator_uses_the_narrow_form_for_narrow_outputs(dt: DType, narrow: bool) -> None:
    g, (x,) = graph((dt, (4, 8)))
    g.outputs = list(g.add("Gelu", [x], {"approximate": "none"}))
    text = "\n".join(build_program(g).lines)
    assert ("km.gelu_narrow" in text) is narrow and ("tl.erf" in text) is not narrow, text
