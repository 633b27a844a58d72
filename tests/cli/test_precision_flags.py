"""`--layer-precision`: pins that cannot apply are refused with one clear line."""

from __future__ import annotations

from pathlib import Path

from tests.cli.helpers import kiln_cli, tiny_cnn, user_error


def test_pins_on_an_fp32_build_are_refused(tmp_path) -> None:
    model = tiny_cnn(tmp_path / "m.onnx")
    user_error(kiln_cli("build", model, "--shapes", "x:1x3x8x8", "--device", "cpu", "--layer-precision", "conv1:fp32"),
               "fp32 build", "--fp16")


def test_a_malformed_pin_is_refused(tmp_path) -> None:
    model = tiny_cnn(tmp_path / "m.onnx")
    user_error(kiln_cli("build", model, "--shapes", "x:1x3x8x8", "--layer-precision", "conv1"), "NAME:PRECISION")


def _samples(folder: Path) -> Path:
    """Four random tiny_cnn inputs, one .npy file each."""
    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(folder / f"{i:03d}.npy", rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    return folder


def test_int8_build_from_a_folder_of_samples_says_what_it_did(tmp_path) -> None:
    from tests.cli.helpers import ok

    model = tiny_cnn(tmp_path / "m.onnx")
    calib = _samples(tmp_path / "calib")
    out = ok(kiln_cli("build", model, "--shapes", "x:2x3x8x8", "--device", "cpu", "--int8", "--calib", str(calib),
                      "--calib-cache", str(tmp_path / "scales.json"), "-o", str(tmp_path / "m.kiln")))
    assert "int8: 2 layers quantized (entropy calibration)" in out, out
    assert (tmp_path / "scales.json").exists()
    again = ok(kiln_cli("build", model, "--shapes", "x:2x3x8x8", "--device", "cpu", "--int8",
                        "--calib-cache", str(tmp_path / "scales.json"), "-o", str(tmp_path / "m2.kiln")))
    assert "scales from the cache" in again


def test_fp8_build_quantizes_the_matmuls_and_the_convs(tmp_path) -> None:
    """--fp8 quantizes the conv too; on a CPU only the GEMM has an FP8 kernel (torch's CPU _scaled_mm), the
    conv's float8 layer is computed by the reference, and the report says so."""
    from tests.cli.helpers import ok

    model = tiny_cnn(tmp_path / "m.onnx")
    calib = _samples(tmp_path / "calib")
    out = ok(kiln_cli("build", model, "--shapes", "x:2x3x8x8", "--device", "cpu", "--fp8", "--calib", str(calib),
                      "--opt-level", "0", "-o", str(tmp_path / "m.kiln")))  # tactic order, not CPU timings
    assert "fp8: 2 layers quantized to float8 E4M3 (minmax calibration); 1 run on FP8 kernels, the others compute " \
           "their results in float" in out, out
    assert "quantized in the model" not in out  # that line is for models quantized before import


def test_int8_without_samples_is_refused(tmp_path) -> None:
    model = tiny_cnn(tmp_path / "m.onnx")
    user_error(kiln_cli("build", model, "--shapes", "x:2x3x8x8", "--device", "cpu", "--int8"), "calibration data")


def test_the_build_report_counts_every_int8_and_fp8_kernel() -> None:
    """`kiln build` counts the layers on 8-bit kernels by tactic name: every registered tactic that runs int8 or
    float8 products must be in those lists, or the report under-counts (a Triton int8 GEMM counted as float)."""
    from kiln.cli.build import FP8_TACTICS, INT8_TACTICS
    from kiln.kernels import registry

    registry.get("reference")  # loads every tactic module
    names = {name for name, _ in registry.TACTICS.items()}
    int8 = {n for n in names if "int8" in n or n.endswith("_integer")}
    fp8 = {n for n in names if "fp8" in n and "quantize" not in n}
    assert int8 and int8 <= INT8_TACTICS <= names
    assert fp8 and fp8 <= FP8_TACTICS <= names


def test_the_fp8_line_names_the_unpromoted_layers() -> None:
    """A GPU FP8 build whose tuner kept `triton.fp8_gemm_fast` on some layers says how many sum without float32
    promotion; without any, the line is as before."""
    from kiln.cli.build import fp8_summary

    lowered = {"fp8_layers": 4, "calibrator": "minmax"}
    line = fp8_summary(lowered, ["triton.fp8_gemm_fast", "cuda.fp8_gemm", "triton.fp8_gemm_fast", "triton.layernorm"])
    assert line.startswith("fp8: 4 layers quantized to float8 E4M3 (minmax calibration); 3 run on FP8 kernels")
    assert "; 2 of them sum their products in the tensor cores without float32 promotion" in line
    assert "promotion" not in fp8_summary(lowered, ["cuda.fp8_gemm", "triton.fp8_gemm"])
