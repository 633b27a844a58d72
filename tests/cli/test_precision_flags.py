"""`--layer-precision`: pins that cannot apply are refused with one clear line."""

from __future__ import annotations

from tests.cli.helpers import kiln_cli, tiny_cnn, user_error


def test_pins_on_an_fp32_build_are_refused(tmp_path) -> None:
    model = tiny_cnn(tmp_path / "m.onnx")
    user_error(kiln_cli("build", model, "--shapes", "x:1x3x8x8", "--device", "cpu", "--layer-precision", "conv1:fp32"),
               "fp32 build", "--fp16")


def test_a_malformed_pin_is_refused(tmp_path) -> None:
    model = tiny_cnn(tmp_path / "m.onnx")
    user_error(kiln_cli("build", model, "--shapes", "x:1x3x8x8", "--layer-precision", "conv1"), "NAME:PRECISION")
