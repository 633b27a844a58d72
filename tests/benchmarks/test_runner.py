"""The benchmark runner's plumbing, end to end on the CPU with the test-only tiny models (no timing assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from benchmarks.checks import MIN_COSINE, compare_one
from benchmarks.report import INTRO
from benchmarks.run import main

MODELS = ("tiny_cnn", "tiny_bert")
BATCHES = (1, 2)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    tmp = tmp_path_factory.mktemp("bench")
    results, out = tmp / "RESULTS.md", tmp / "out.json"
    argv = ["--models", ",".join(MODELS), "--batch", ",".join(map(str, BATCHES)), "--device", "cpu",
            "--precision", "fp32", "--modes", "eager,cudagraph,kiln", "--warmup", "1", "--iters", "3",
            "--results", str(results), "--json", str(out), "--workdir", str(tmp / "work"),
            "--kiln-opt-level", "1"]
    flags = _torch_flags()
    with pytest.MonkeyPatch.context() as mp:  # the runner points the compile caches at its workdir: undo that
        for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            mp.setenv(var, str(tmp / "unused"))
        try:
            code = main(argv)
        finally:
            _set_torch_flags(flags)
    return results, out, code


def _torch_flags() -> tuple[bool, bool, bool]:
    import torch

    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)


def _set_torch_flags(flags: tuple[bool, bool, bool]) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


def test_exit_code_and_files(smoke: tuple[Path, Path, int]) -> None:
    results, out, code = smoke
    assert code == 0
    assert results.exists() and out.exists()


def test_results_markdown(smoke: tuple[Path, Path, int]) -> None:
    text = smoke[0].read_text()
    assert text.startswith(INTRO)  # a new file gets the introduction first
    assert "## " in text and "- command: `python -m benchmarks.run --models tiny_cnn,tiny_bert" in text
    for model in MODELS:
        for batch in BATCHES:
            assert f"### {model} · batch {batch} · fp32 · cpu" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert sum(r.startswith("| eager | ") for r in rows) == len(MODELS) * len(BATCHES)
    assert sum(r.startswith("| kiln | ") and "ERROR" not in r for r in rows) == len(MODELS) * len(BATCHES)
    assert sum(r.startswith("| cudagraph | skipped") for r in rows) == len(MODELS) * len(BATCHES)
    assert "kiln / best torch (eager" in text


def test_json_numbers(smoke: tuple[Path, Path, int]) -> None:
    doc = json.loads(smoke[1].read_text())
    assert doc["environment"]["kiln"] and doc["environment"]["torch"]
    assert doc["interrupted"] is False
    cases = doc["cases"]
    assert [(c["model"], c["batch"]) for c in cases] == [(m, b) for m in MODELS for b in BATCHES]
    for c in cases:
        modes = {m["mode"]: m for m in c["modes"]}
        assert modes["cudagraph"]["status"] == "skipped"
        for name in ("eager", "kiln"):
            m = modes[name]
            assert m["status"] == "ok", m["error"]
            st = m["stats"]
            assert st["iters"] == 3 and len(st["samples_ms"]) == 3
            assert all(st[k] > 0 for k in ("median_ms", "p10_ms", "p90_ms", "mean_ms"))
        kiln = modes["kiln"]
        assert kiln["setup_s"]["build_cold_s"] > 0 and kiln["setup_s"]["build_warm_s"] > 0
        assert c["export_s"] > 0
        assert c["best_torch_mode"] == "eager" and c["kiln_over_best_torch"] > 0
        outputs = [x["output"] for x in kiln["checks"]]
        assert outputs == (["logits"] if c["model"] == "tiny_cnn" else ["last_hidden_state", "pooler_output"])
        for x in kiln["checks"]:
            assert x["cosine"] >= MIN_COSINE["fp32"] and x["max_abs"] < 1e-3


def test_results_append(tmp_path: Path) -> None:
    from benchmarks.report import append_results

    path = tmp_path / "R.md"
    append_results(path, "## first\n")
    append_results(path, "## second\n")
    text = path.read_text()
    assert text.count(INTRO) == 1 and text.index("## first") < text.index("## second")


def test_classifier_outputs_get_top1_agreement() -> None:
    import torch

    ref = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    got = ref.clone()
    got[3] = torch.tensor([0.1, 0.7, 0.2])  # one row of four changes its top class
    assert compare_one("logits", got, ref).top1 == pytest.approx(0.75)
    assert compare_one("logits", ref, ref).top1 == 1.0
    assert compare_one("hidden", torch.ones(2, 3, 4), torch.ones(2, 3, 4)).top1 is None  # not [batch, classes]


def test_compare_one_flags_bad_outputs() -> None:
    import torch

    x = torch.randn(4, 8)
    assert compare_one("y", x, x).cosine == pytest.approx(1.0)
    assert compare_one("y", -x, x).cosine == pytest.approx(-1.0)
    assert compare_one("y", torch.full_like(x, math.nan), x).cosine == 0.0
    with pytest.raises(ValueError, match="shape"):
        compare_one("y", x[:2], x)


def test_the_json_renders_the_same_section(smoke: tuple[Path, Path, int], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.render import main as render

    results, out, _ = smoke
    written = results.read_text()[len(INTRO):].strip()
    assert render([str(out)]) == 0
    rendered = capsys.readouterr().out.strip()
    squeeze = lambda t: [line.rstrip() for line in t.splitlines() if line.strip()]  # noqa: E731
    assert squeeze(rendered) == squeeze(written)  # every number, from the JSON alone
    target = tmp_path / "R.md"
    assert render([str(out), "--state", "test state", "--results", str(target)]) == 0
    assert "\nkiln state: test state\n" in target.read_text()


def _one_case(argv: list[str], out: Path) -> dict:
    """Runs the runner (restoring torch's global flags after) and returns the one case of its JSON file `out`."""
    flags = _torch_flags()
    try:
        assert main(argv) == 0
    finally:
        _set_torch_flags(flags)
    (case,) = json.loads(out.read_text())["cases"]
    return case


def test_the_int8_mode_builds_calibrated_engines_and_reports_the_speedup(tmp_path: Path) -> None:
    out, results = tmp_path / "int8.json", tmp_path / "R.md"
    argv = ["--models", "tiny_cnn", "--batch", "2", "--device", "cpu", "--precision", "fp32", "--modes",
            "eager,kiln,kiln-int8", "--warmup", "1", "--iters", "3", "--results", str(results), "--json", str(out),
            "--workdir", str(tmp_path / "work"), "--kiln-opt-level", "1"]
    case = _one_case(argv, out)
    int8 = next(m for m in case["modes"] if m["mode"] == "kiln-int8")
    assert int8["status"] == "ok", int8.get("error")
    assert int8["stats"]["median_ms"] > 0 and int8["checks"][0]["cosine"] > 0.99
    assert "kiln-int8 / kiln fp32: **" in results.read_text()


def test_quantized_modes_take_a_calibrator_and_an_accuracy_target(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gate.json"
    argv = ["--models", "tiny_cnn", "--batch", "2", "--device", "cpu", "--precision", "fp32", "--modes",
            "kiln,kiln-int8,kiln-fp8", "--warmup", "1", "--iters", "3", "--no-results", "--json", str(out),
            "--workdir", str(tmp_path / "work"), "--kiln-opt-level", "1", "--kiln-calibrator", "minmax",
            "--kiln-accuracy-target", "cosine>=0.9999"]
    case = _one_case(argv, out)
    for name in ("kiln-int8", "kiln-fp8"):
        m = next(m for m in case["modes"] if m["mode"] == name)
        assert m["status"] == "ok", m.get("error")
    err = capsys.readouterr().err
    assert "int8] accuracy gate cosine>=0.9999: met" in err and "fp8] accuracy gate cosine>=0.9999: met" in err, err


def test_the_nopdl_and_norefine_modes_build_from_the_kiln_timings_and_report_against_kiln(tmp_path: Path) -> None:
    """kiln-nopdl and kiln-norefine (opt-in): the engines store pdl=False / refine=False, are built from the kiln
    mode's timing cache (that mode ran first), and the report gives each / kiln."""
    out, results = tmp_path / "pdl.json", tmp_path / "R.md"
    argv = ["--models", "tiny_cnn", "--batch", "2", "--device", "cpu", "--precision", "fp32", "--modes",
            "kiln,kiln-nopdl,kiln-norefine", "--warmup", "1", "--iters", "3", "--results", str(results),
            "--json", str(out), "--workdir", str(tmp_path / "work"), "--kiln-opt-level", "1",
            "--kiln-save", str(tmp_path / "eng")]
    case = _one_case(argv, out)
    text = results.read_text()
    for mode in ("kiln-nopdl", "kiln-norefine"):
        m = next(m for m in case["modes"] if m["mode"] == mode)
        assert m["status"] == "ok", m.get("error")
        assert f"{mode} / kiln fp32: **" in text
        row = next(line for line in text.splitlines() if line.startswith(f"| {mode} |"))
        assert "warm" in row and "cold" not in row  # built from the kiln mode's timings: no cold build to report
    import kiln

    saved = {p.name: (kiln.load(p).pdl, kiln.load(p).metadata["config"]["refine"])
             for p in (tmp_path / "eng").glob("*.kiln")}
    assert saved == {"tiny_cnn-bs2-fp32.kiln": (None, True), "tiny_cnn-bs2-fp32-nopdl.kiln": (False, True),
                     "tiny_cnn-bs2-fp32-norefine.kiln": (None, False)}


@pytest.mark.parametrize("how", [["--exporter", "dynamo"], ["--as-built"]])
def test_the_export_can_be_torch_export_or_the_model_as_built(tmp_path: Path, how: list[str]) -> None:
    """--exporter dynamo (torch.export, torch's default) and --as-built (BERT with transformers' default SDPA
    attention, not the eager export variant): kiln builds and checks that file; the settings line says so."""
    out, results = tmp_path / "x.json", tmp_path / "R.md"
    argv = ["--models", "tiny_bert", "--batch", "2", "--device", "cpu", "--precision", "fp32", "--modes",
            "eager,kiln", "--warmup", "1", "--iters", "3", "--results", str(results), "--json", str(out),
            "--workdir", str(tmp_path / "work"), "--kiln-opt-level", "1", *how]
    case = _one_case(argv, out)
    m = next(m for m in case["modes"] if m["mode"] == "kiln")
    assert m["status"] == "ok", m.get("error")
    assert min(c["cosine"] for c in m["checks"]) > 0.9999
    name = "tiny_bert-dynamo.onnx" if how[0] == "--exporter" else "tiny_bert-as-built.onnx"
    assert (tmp_path / "work" / name).exists()
    assert ("exporter dynamo" if how[0] == "--exporter" else "models exported as built") in results.read_text()
