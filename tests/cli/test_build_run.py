"""`kiln build` and `kiln run` as users run them (subprocesses, exit codes), and the shape-spec parser."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import kiln
from kiln.cli.shapes import ShapeSpecError, add_shape_args, parse_shapes, profiles_from_args
from tests.cli.helpers import embedding, kiln_cli, ok, tiny_cnn, user_error


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("build_run")
    tiny_cnn(d / "cnn.onnx")
    embedding(d / "emb.onnx")
    return d


@pytest.fixture(scope="module")
def engine(work: Path) -> Path:
    """Two profiles: a dynamic batch 1..4 (opt 2) and a fixed batch of 8."""
    out = work / "cnn.kiln"
    r = kiln_cli("build", str(work / "cnn.onnx"), "-o", str(out), "--min-shapes", "x:1x3x8x8", "--opt-shapes",
                 "x:2x3x8x8", "--max-shapes", "x:4x3x8x8", "--profile", "--shapes", "x:8x3x8x8")
    text = ok(r)
    for stage in ("importing the model", "optimizing the graph", "serializing", "summary"):
        assert stage in text, text
    assert "4 imported -> 3 after optimization" in text  # the Relu became conv1's epilogue
    assert "epilogue_fusion: 1 epilogues" in text
    assert "precision   layers: float32 x3" in text
    # conv1 at the opt shape: 2 * (2*4*8*8 outputs) * (3*3*3 taps); fc: 2 * (2*10) * 256
    assert "FLOPs of the matrix products: float32 100.0 % (37.89 kFLOP at profile 0's opt shapes)" in text
    assert "x 1x3x8x8..4x3x8x8 (opt 2x3x8x8)" in text and "profile 1   x 8x3x8x8" in text
    assert "activation arena" in text and "engine      " in text
    return out


def ort_run(model: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


# --- build ---------------------------------------------------------------------------------------------------


def test_build_writes_an_engine_with_both_profiles(engine: Path) -> None:
    e = kiln.load(engine)
    ranges = [p.shapes["x"] for p in e.plan.profiles]
    assert [(r.min, r.opt, r.max) for r in ranges] == [
        ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)), ((8, 3, 8, 8),) * 3]
    assert e.metadata["config"]["device"] == "cpu"


def test_build_tunes_and_reports_progress(work: Path) -> None:
    text = ok(kiln_cli("build", str(work / "cnn.onnx"), "-o", str(work / "tuned.kiln"), "--shapes", "x:2x3x8x8",
                       "--timing-cache", str(work / "cache.json"), "--deterministic"))
    assert (work / "tuned.kiln").exists() and (work / "cache.json").exists()
    assert "tuning" in text and "layers timed" in text


def test_build_user_mistakes(work: Path, tmp_path: Path) -> None:
    model = str(work / "cnn.onnx")
    user_error(kiln_cli("build", str(tmp_path / "nope.onnx")), "nope.onnx", "not found")
    user_error(kiln_cli("build", model, "--shapes", "x:1x3xZx8"), "bad shape", "1x3xZx8")
    user_error(kiln_cli("build", model, "--shapes", "y:1x3x8x8", "-o", str(tmp_path / "a.kiln")),
               "input 'y'", "x")
    user_error(kiln_cli("build", model, "-o", str(tmp_path / "a.kiln")), "input 'x'", "--shapes")
    user_error(kiln_cli("build", model, "-o", str(tmp_path / "no" / "dir" / "a.kiln")), "does not exist")
    user_error(kiln_cli("build", model, "--min-shapes", "x:4x3x8x8", "--max-shapes", "x:1x3x8x8"), "min <= opt <= max")
    user_error(kiln_cli("build", model, "--shapes", "x:1x3x8x8", "--fp16", "--device", "cpu"), "fp16", "GPU")
    verbose = kiln_cli("--verbose", "build", model, "--shapes", "x:1x3xZx8")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


# --- run -----------------------------------------------------------------------------------------------------


def test_run_engine_on_a_given_input_saves_outputs(engine: Path, work: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    text = ok(kiln_cli("run", str(engine), "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "o")))
    assert "random" not in text
    assert "output  y  float32 [3x10]" in text and "min " in text and "mean " in text
    y = np.load(tmp_path / "o" / "y.npy")
    np.testing.assert_allclose(y, ort_run(work / "cnn.onnx", x), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "inputs.npz")["x"], x)


def test_run_onnx_with_random_inputs_is_seeded_and_says_so(work: Path, tmp_path: Path) -> None:
    outs = []
    for k in range(2):
        out = tmp_path / f"{k}"
        text = ok(kiln_cli("run", str(work / "cnn.onnx"), "--shapes", "x:2x3x8x8", "--output-dir", str(out)))
        assert "built in memory" in text and "random inputs (seed 0" in text and ": x" in text
        outs.append(np.load(tmp_path / f"{k}" / "y.npy"))
    x = np.load(tmp_path / "0" / "inputs.npz")["x"]
    np.testing.assert_array_equal(np.load(tmp_path / "1" / "inputs.npz")["x"], x)  # the same seeded inputs
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)  # each build may time other tactics faster
    assert x.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(outs[0], ort_run(work / "cnn.onnx", x), rtol=1e-4, atol=1e-4)


def test_run_int_inputs_default_to_ones_or_a_range(work: Path, tmp_path: Path) -> None:
    model = str(work / "emb.onnx")
    ok(kiln_cli("run", model, "--shapes", "ids:2x4", "--output-dir", str(tmp_path / "a")))
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "y.npy"), np.tile([12.0, 16.0, 20.0], (2, 1)))
    ok(kiln_cli("run", model, "--shapes", "ids:2x4", "--int-range", "ids:0,4", "--output-dir", str(tmp_path / "b")))
    ids = np.load(tmp_path / "b" / "inputs.npz")["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() <= 4 and len(np.unique(ids)) > 1


def test_run_user_mistakes(engine: Path, work: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    np.save(tmp_path / "xi.npy", np.zeros((2, 3, 8, 8), np.int64))
    np.save(tmp_path / "big.npy", np.zeros((5, 3, 8, 8), np.float32))
    user_error(kiln_cli("run", str(engine), "--input", f"z={tmp_path / 'x.npy'}"), "input 'z'", "inputs are: x")
    user_error(kiln_cli("run", str(engine), "--input", f"x={tmp_path / 'missing.npy'}"), "missing.npy", "not found")
    user_error(kiln_cli("run", str(engine), "--input", f"x={tmp_path / 'xi.npy'}"), "expects float32", "int64")
    user_error(kiln_cli("run", str(engine), "--input", f"x={tmp_path / 'big.npy'}"), "no optimization profile")
    broken = tmp_path / "broken.kiln"
    broken.write_bytes(engine.read_bytes()[:-100])
    user_error(kiln_cli("run", str(broken)), "broken.kiln", "corrupted")
    user_error(kiln_cli("run", str(work / "cnn.onnx")), "dynamic shape", "--shapes x:")


# --- shape specs (in process) ----------------------------------------------------------------------------


def _ns(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_shape_args(p, profiles=True)
    return p.parse_args(list(argv))


def test_shape_specs() -> None:
    assert parse_shapes("x:1x3x224x224,mask:1x128") == {"x": (1, 3, 224, 224), "mask": (1, 128)}
    assert parse_shapes(["input:0:2x3", "s:"]) == {"input:0": (2, 3), "s": ()}  # TF-style names; scalars
    for bad in ("x", "x:1x-2", "x:1,x:2", ":1x2", "x:1xx2"):
        with pytest.raises(ShapeSpecError):
            parse_shapes(bad)


def test_profile_groups() -> None:
    ns = _ns("--min-shapes", "x:1x4", "--max-shapes", "x:8x4", "--shapes", "m:1", "--profile", "--opt-shapes",
             "x:2x4", "--shapes", "m:2")
    assert profiles_from_args(ns) == [
        {"x": ((1, 4), (8, 4), (8, 4)), "m": ((1,), (1,), (1,))},  # no opt: the max
        {"x": ((2, 4), (2, 4), (2, 4)), "m": ((2,), (2,), (2,))},  # only opt: min = max = opt
    ]
    assert profiles_from_args(_ns()) == []
    with pytest.raises(ShapeSpecError, match="both"):
        profiles_from_args(_ns("--shapes", "x:1", "--min-shapes", "x:1"))
    with pytest.raises(ShapeSpecError, match="ranks"):
        profiles_from_args(_ns("--min-shapes", "x:1", "--max-shapes", "x:1x2"))


def test_summary_warns_when_the_asked_precision_is_missing(engine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli.build import print_summary

    e = kiln.load(engine)
    e.metadata["config"]["precision"] = "fp16"  # as a GPU build whose precision pass changed nothing would record
    print_summary(e, str(engine), 123, {"import": 0.1})
    out = capsys.readouterr().out
    assert "warning: float16 was asked for, but no layer computes in float16: this engine is float32 x3" in out
    assert "123 B" in out and "import 0.10 s" in out


def test_summary_reports_each_pass() -> None:
    from kiln.cli.build import pass_lines

    passes = [{"name": "fold_batchnorm", "counts": {"folded": 53}, "nodes_after": 212},
              {"name": "dead_nodes", "counts": {"nodes_removed": 0, "weights_removed": 0}, "nodes_after": 212},
              {"name": "cse", "counts": {"merged": 2, "constants_merged": 1}, "nodes_after": 210}]
    assert pass_lines(passes) == ["fold_batchnorm: 53 folded (-> 212 layers)",
                                  "cse: 2 merged, 1 constants merged (-> 210 layers)"]


def test_summary_reports_the_whole_engine_search(engine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """GPU builds record what `kiln.tune.refine` did per profile; the summary shows it (set by hand here: CPU builds
    do not search)."""
    from kiln.cli.build import print_summary, refine_line

    e = kiln.load(engine)
    e.plan.stats["tuning"]["refine"] = [
        {"groups": 10, "trials": 28, "kept": ["ae3a024057c6 x12: cuda.linear -> triton.gemm{'tile': 'x'} (0.9737x)"],
         "rejected": [], "seconds": 3.81, "before_ms": 0.4269, "after_ms": 0.4209},
        {"skipped": "another profile takes its opt shapes"}]
    print_summary(e, str(engine), 123, {"import": 0.1})
    out = capsys.readouterr().out
    assert "refine      profile 0: 28 trials over 10 groups in 3.8 s, 1 changed; engine 0.4269 -> 0.4209 ms" in out
    assert "ae3a024057c6 x12: cuda.linear -> triton.gemm{'tile': 'x'} (0.9737x)" in out
    assert "refine      profile 1: not run: another profile takes its opt shapes" in out
    assert refine_line({"groups": 0, "trials": 0, "kept": [], "seconds": 0.0}) == \
        "0 trials over 0 groups in 0.0 s, 0 changed"
