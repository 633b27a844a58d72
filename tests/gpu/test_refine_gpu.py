"""The whole-engine search on the GPU (`kiln.tune.refine`): CUDA-graph timing of engines that differ in their
choices, and FP16 builds that search, compute the model, and hand the decisions to a warm rebuild."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln
from kiln.runtime.engine import Engine
from kiln.runtime.plan import Choice, Plan
from kiln.tune import refine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _block(layers: int = 3, rows: int = 128, width: int = 256) -> onnx.ModelProto:
    """`layers` transformer FFN blocks at batch 1: LayerNorm, up-projection + bias, GELU (erf), down-projection +
    bias, residual add - identical layers, so each of their products is one timing-cache group."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def init(name: str, *shape: int, scale: float = 0.05) -> str:
        inits.append(onnx.numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    c = {k: onnx.numpy_helper.from_array(np.array(v, np.float32), k) for k, v in
         (("half", 0.5), ("one", 1.0), ("sqrt2", 2 ** 0.5))}
    inits += list(c.values())
    x = "x"
    for i in range(layers):
        p = f"l{i}_"
        nodes += [
            helper.make_node("LayerNormalization", [x, init(p + "g", width, scale=1.0), init(p + "b", width)],
                             [p + "n"], axis=-1, name=p + "ln"),
            helper.make_node("MatMul", [p + "n", init(p + "w1", width, 4 * width)], [p + "u"], name=p + "up"),
            helper.make_node("Add", [p + "u", init(p + "b1", 4 * width)], [p + "ub"], name=p + "up_bias"),
            helper.make_node("Div", [p + "ub", "sqrt2"], [p + "d"], name=p + "div"),
            helper.make_node("Erf", [p + "d"], [p + "e"], name=p + "erf"),
            helper.make_node("Add", [p + "e", "one"], [p + "e1"], name=p + "erf1"),
            helper.make_node("Mul", [p + "ub", p + "e1"], [p + "m"], name=p + "mul"),
            helper.make_node("Mul", [p + "m", "half"], [p + "gelu"], name=p + "gelu"),
            helper.make_node("MatMul", [p + "gelu", init(p + "w2", 4 * width, width)], [p + "dn"], name=p + "down"),
            helper.make_node("Add", [p + "dn", init(p + "b2", width)], [p + "db"], name=p + "down_bias"),
            helper.make_node("Add", [p + "db", x], [p + "out"], name=p + "residual"),
        ]
        x = p + "out"
    g = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, width])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, rows, width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_an_fp16_build_searches_computes_the_model_and_a_warm_rebuild_takes_its_decisions(tmp_path: Path) -> None:
    cache = tmp_path / "t.cache"
    cfg = kiln.BuilderConfig(device="cuda", precision="fp16", timing_cache=str(cache))
    engine = kiln.build(_block(), cfg)
    (rep,) = engine.plan.stats["tuning"]["refine"]
    assert "skipped" not in rep, rep
    assert rep["groups"] >= 1 and rep["trials"] >= rep["groups"], rep  # the products had close runners-up
    assert rep["before_ms"] > 0 and rep["after_ms"] > 0
    assert rep["seconds"] < refine.BUDGET_S  # finished: every group decided
    x = np.random.default_rng(1).standard_normal((1, 128, 256)).astype(np.float32)
    got = engine.create_context().run({"x": x})
    want = kiln.run_reference(_block(), {"x": x})
    (name,) = want
    assert _cosine(got[name], want[name]) > 0.999
    warm = kiln.build(_block(), cfg)
    assert "refine" not in warm.plan.stats["tuning"]  # every group's decision came from the cache
    assert warm.plan.choices == engine.plan.choices
    off = kiln.build(_block(), kiln.BuilderConfig(device="cuda", precision="fp16", refine=False))
    assert "refine" not in off.plan.stats["tuning"] and off.metadata["config"]["refine"] is False


def test_graph_bench_times_an_engine_against_itself_as_even() -> None:
    engine = kiln.build(_block(layers=2), kiln.BuilderConfig(device="cuda", precision="fp16", refine=False))
    plan = engine.plan

    def make(per: list[Choice]) -> Engine:
        return Engine(Plan(plan.graph, plan.profiles, [per], plan.memory), engine.metadata, "cuda")

    feeds = {"x": torch.randn(1, 128, 256, device="cuda")}
    bench = refine.GraphBench(make, feeds, list(plan.choices[0]))
    assert 0 < bench.first_s < 0.01 and bench.reps >= 1
    r, faster = bench.ratio(list(plan.choices[0]))
    assert 0.9 < r < 1.1 and 0.0 <= faster <= 1.0  # the same plan: no change beyond timing noise
    bench.accept()
    assert bench.base is bench.last  # the trial is the engine later trials are timed against
