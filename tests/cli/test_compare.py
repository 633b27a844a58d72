"""`kiln compare`: kiln against onnxruntime, per output and per layer; exit codes 0 / 1 / 2."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from kiln.cli.compare import Tolerance, compare_arrays
from tests.cli.helpers import chain, embedding, kiln_cli, ok, tiny_cnn, user_error


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("compare")
    tiny_cnn(d / "cnn.onnx")
    chain(d / "chain.onnx")
    chain(d / "stale.onnx", offset=1.5)  # same I/O, another weight in its first layer
    embedding(d / "emb.onnx")
    ok(kiln_cli("build", str(d / "stale.onnx"), "-o", str(d / "stale.kiln"), "--opt-level", "0"))
    return d


def test_passes_built_in_memory(work: Path) -> None:
    text = ok(kiln_cli("compare", str(work / "cnn.onnx"), "--shapes", "x:2x3x8x8"))
    assert "random inputs (seed 0" in text
    assert "tolerance: rtol 0.0001, atol 0.0001 x RMS of each onnxruntime tensor, check elemwise" in text
    assert "output 'y'  float32 [2x10]" in text and "cosine similarity 1.0000" in text
    assert "PASSED | output 'y'" in text and text.rstrip().endswith("PASSED | all 1 outputs matched")


def _per_layer_rows(text: str) -> dict[str, list[str]]:
    """The per-layer table by tensor name: [layer, shape, max abs, max rel, cosine, verdict]."""
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 8 and cells[0].isdigit() and cells[-1] in ("PASSED", "FAILED"):
            rows[cells[2]] = [cells[1], *cells[3:]]
    return rows


def test_per_layer_with_an_engine(work: Path) -> None:
    ok(kiln_cli("build", str(work / "cnn.onnx"), "-o", str(work / "cnn.kiln"), "--shapes", "x:3x3x8x8"))
    text = ok(kiln_cli("compare", str(work / "cnn.onnx"), "--engine", str(work / "cnn.kiln"), "--per-layer"))
    assert "inputs: x:3x3x8x8" in text  # the engine's opt shape
    rows = _per_layer_rows(text)
    # Intermediates that survive optimization: relu1's output (conv1's is inside the fused step) and flat's.
    assert set(rows) == {"r", "f"}
    assert rows["r"][0] == "conv1 + relu1" and rows["r"][1] == "3x4x8x8" and rows["f"][1] == "3x256"
    assert "no layer diverges" in text and "and 2 intermediate tensors" in text


def test_names_the_first_layer_that_diverges(work: Path) -> None:
    r = kiln_cli("compare", str(work / "chain.onnx"), "--engine", str(work / "stale.kiln"), "--per-layer")
    text = ok(r, 1)
    assert "note: the engine was built from 'stale.onnx', not 'chain.onnx'" in text
    rows = {cells[0]: cells for cells in _per_layer_rows(text).values()}
    assert rows["add1"][-1] == "FAILED" and rows["soft"][-1] == "FAILED"
    assert "first divergence: layer 'add1' (Add), tensor 'a'" in text
    assert "FAILED | output 'y'" in text
    assert "FAILED | mismatched outputs: ['y']; 2 of 2 intermediate tensors differ, the first at layer 'add1'" in text


def test_given_inputs_and_int_inputs(work: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "ids.npy", np.array([[0, 1, 2, 3], [4, 4, 0, 0]], np.int64))
    text = ok(kiln_cli("compare", str(work / "emb.onnx"), "--input", f"ids={tmp_path / 'ids.npy'}", "--per-layer"))
    assert "random" not in text and "inputs: ids:2x4" in text and "PASSED | all 1 outputs matched" in text
    text = ok(kiln_cli("compare", str(work / "emb.onnx"), "--shapes", "ids:3x4", "--int-range", "0,4"))
    assert "ids in [0, 4]" not in text and "integers in [0, 4]" in text


def test_tolerance_and_error_stat(work: Path) -> None:
    r = kiln_cli("compare", str(work / "chain.onnx"), "--engine", str(work / "stale.kiln"), "--rtol", "0.6",
             "--check-error-stat", "max")
    assert ok(r).rstrip().endswith("PASSED | all 1 outputs matched")  # |3a - 2a| / |2a| = 0.5 everywhere


def test_user_mistakes(work: Path, tmp_path: Path) -> None:
    user_error(kiln_cli("compare", str(tmp_path / "no.onnx")), "no.onnx", "not found")
    user_error(kiln_cli("compare", str(work / "cnn.onnx")), "dynamic shape", "--shapes x:")
    user_error(kiln_cli("compare", str(work / "emb.onnx"), "--engine", str(work / "stale.kiln")), "does not match",
               "['x'] -> ['y']", "['ids'] -> ['y']")
    user_error(kiln_cli("compare", str(work / "cnn.onnx"), "--engine", str(work / "stale.kiln")), "does not match",
               "input 'x' is float32[2,6]", "rank 4")
    user_error(kiln_cli("compare", str(work / "stale.kiln")), "is a kiln engine", "--engine")
    user_error(kiln_cli("compare", str(work / "chain.onnx"), "--engine", str(work / "emb.onnx")), "not a kiln engine")
    emb = [str(work / "emb.onnx"), "--shapes", "ids:2x4"]
    user_error(kiln_cli("compare", *emb, "--int-range", "ids:9,3"), "LO must be")
    user_error(kiln_cli("compare", *emb, "--int-range", "ids:5,9"), "lookup")  # out-of-range indices: the node named


# --- the statistics (in process) ---------------------------------------------------------------------------


def test_compare_arrays() -> None:
    ref = np.array([1.0, 2.0, 0.0, -4.0], np.float32)
    r = compare_arrays(ref + np.float32(1e-6), ref, rtol=1e-5, atol=1e-5)
    assert r["passed"] and r["mismatched"] == 0 and r["cosine"] == pytest.approx(1.0)
    got = ref.copy()
    got[3] = -4.1
    r = compare_arrays(got, ref, rtol=1e-3, atol=1e-3)
    assert not r["passed"] and r["mismatched"] == 1 and r["max_abs_at"] == [3]
    assert r["max_abs"] == pytest.approx(0.1, rel=1e-5) and r["max_rel"] == pytest.approx(0.025, rel=1e-5)
    assert compare_arrays(got, ref, rtol=0.03, atol=0.0)["passed"]  # elemwise: within rtol is enough
    assert not compare_arrays(got, ref, rtol=1e-3, atol=1e-3, stat="max")["passed"]
    assert compare_arrays(got, ref, rtol=1e-3, atol=0.03, stat="mean")["passed"]  # mean abs = 0.025
    assert compare_arrays(np.array([np.nan, np.inf]), np.array([np.nan, np.inf]), 0, 0)["passed"]
    assert not compare_arrays(np.array([np.nan, 1.0]), np.array([0.0, 1.0]), 1, 1)["passed"]
    assert compare_arrays(np.zeros(3), np.zeros(3), 0, 0)["cosine"] == 1.0
    assert "shape" in compare_arrays(np.zeros(3), np.zeros(4), 1, 1)["reason"]
    assert compare_arrays(np.float32(2.0), np.float32(2.0), 0, 0)["passed"]  # scalars
    assert not compare_arrays(np.array(["a"], object), np.array(["b"], object), 1, 1)["passed"]


def test_default_atol_scales_with_the_tensor() -> None:
    ref = np.array([100.0, -200.0, 0.5], np.float32)
    got = ref + np.float32(0.01)  # 1e-4 relative on the large values, 2e-2 on the small one
    scaled = Tolerance(1e-4, 1e-4, scaled=True)
    r = scaled.check(got, ref)
    rms = np.sqrt(np.mean(ref.astype(np.float64) ** 2))
    assert r["atol"] == pytest.approx(1e-4 * rms) and r["passed"]  # 0.01 <= 1e-4 * 129
    assert not Tolerance(1e-4, 1e-4, scaled=False).check(got, ref)["passed"]  # absolute 1e-4: the 0.5 fails
    assert "x RMS" in str(scaled) and "RMS" not in str(Tolerance(1e-4, 1e-3, scaled=False))
    outlier = np.array([1e4] + [1.0] * 9, np.float32)  # RMS ~3162: 1e-4 of it is 0.32, not the 1.0 max would give
    assert not scaled.check(outlier * np.array([1.0] + [1.5] * 9, np.float32), outlier)["passed"]
