"""Shared by the CLI tests: run `kiln` as users do (a subprocess) and write tiny ONNX models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]


def kiln_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`kiln ARGS` in a subprocess, on the CPU also where there is a GPU (the tests' expectations are the CPU's)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


def ok(r: subprocess.CompletedProcess[str], code: int = 0) -> str:
    assert r.returncode == code, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def user_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """A user mistake: exit 2, one or two lines on stderr naming the problem, no traceback."""
    assert r.returncode == 2, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert 1 <= len(err.splitlines()) <= 2, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    return err


def _save(graph: onnx.GraphProto, path: Path) -> str:
    # IR version 8 (opset 17's): onnxruntime releases older than this onnx reject newer IR versions
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return str(path)


def tiny_cnn(path: Path, seed: int = 0) -> str:
    """x[N,3,8,8] -> conv1 -> relu1 -> flat -> fc -> y[N,10]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal((256, 10)).astype(np.float32) * 0.1, "W2")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu1"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "W2"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return _save(g, path)


def chain(path: Path, scale: float = 2.0, offset: float = 1.0) -> str:
    """x[2,6] -> add1 (+1) -> soft (Softmax) -> mul2 (*scale) -> relu3 -> y: a static model whose middle layer can
    be changed. The optimizer keeps add1 and soft as steps of their own and fuses mul2 + relu3."""
    bias = np.ones(6, np.float32)
    bias[0] = offset  # a changed first element changes the softmax too (a uniform shift would not)
    inits = [numpy_helper.from_array(bias, "one"),
             numpy_helper.from_array(np.full(6, scale, np.float32), "scale")]
    nodes = [helper.make_node("Add", ["x", "one"], ["a"], name="add1"),
             helper.make_node("Softmax", ["a"], ["s"], name="soft", axis=-1),
             helper.make_node("Mul", ["s", "scale"], ["m"], name="mul2"),
             helper.make_node("Relu", ["m"], ["y"], name="relu3")]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    return _save(g, path)


def embedding(path: Path) -> str:
    """ids int64[B,4] (indices into a 5-row table) -> gather -> sum -> y[B,3]."""
    table = np.arange(15, dtype=np.float32).reshape(5, 3)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="lookup"),
             helper.make_node("ReduceSum", ["e", "axes"], ["y"], name="pool", keepdims=0)]
    g = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])],
                          [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1]), "axes")])
    return _save(g, path)
