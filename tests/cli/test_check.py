"""`kiln check` as users run it: a subprocess, its output and its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]


def kiln(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _save(tmp: Path, nodes: list, name: str = "m.onnx", opsets: list | None = None) -> str:
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [onnx.numpy_helper.from_array(np.ones(4, np.float32), "w")])
    m = helper.make_model(g, opset_imports=opsets or [helper.make_opsetid("", 17)])
    p = tmp / name
    onnx.save(m, p)
    return str(p)


def test_supported_model_exits_zero(tmp_path: Path) -> None:
    p = _save(tmp_path, [helper.make_node("Add", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["y"])])
    r = kiln("check", p)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUPPORTED" in r.stdout and "NOT SUPPORTED" not in r.stdout


def test_every_problem_is_listed_in_one_pass(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Frob", ["x"], ["a"], name="frob_a"),
        helper.make_node("Relu", ["a"], ["b"], name="relu_after_frob"),
        helper.make_node("Relu", ["x"], ["c"], name="bad_attr", slope=2.0),
        helper.make_node("Acme", ["c"], ["d"], name="custom_op", domain="com.acme"),
        helper.make_node("Twiddle", ["d", "b"], ["y"], name="twiddle_y"),
    ]
    p = _save(tmp_path, nodes, opsets=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
    r = kiln("check", p)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    for name in ("frob_a", "bad_attr", "custom_op", "twiddle_y"):
        assert name in out, f"{name} missing from:\n{out}"
    assert "relu_after_frob" not in out  # supported; only downstream of a problem
    assert "attribute 'slope'" in out and "com.acme" in out and "opset 17" in out
    assert "NOT SUPPORTED: 4 problems" in out


def test_json_report(tmp_path: Path) -> None:
    p = _save(tmp_path, [helper.make_node("Frob", ["x"], ["y"], name="f")])
    r = kiln("check", "--json", p)
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    assert rep["supported"] is False and rep["nodes"] == 1 and rep["ops"] == {"Frob": 1}
    assert rep["problems"][0]["node"] == "f" and rep["problems"][0]["op"] == "Frob"


def test_unreadable_file_is_two_lines_no_traceback(tmp_path: Path) -> None:
    p = tmp_path / "broken.onnx"
    p.write_bytes(b"\x08\x07garbage" * 5)
    r = kiln("check", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "broken.onnx" in r.stderr
    assert 1 <= len(r.stderr.strip().splitlines()) <= 2
    v = kiln("--verbose", "check", str(p))
    assert v.returncode == 2 and "Traceback" in v.stderr


def test_missing_file(tmp_path: Path) -> None:
    r = kiln("check", str(tmp_path / "none.onnx"))
    assert r.returncode == 2 and "not found" in r.stderr
