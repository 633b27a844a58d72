"""The builder: configs, profiles, determinism, memory planning, and engines that equal the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.build.config import BuilderConfig, ConfigError
from kiln.utils.errors import InputError


def _dynamic_model() -> onnx.ModelProto:
    """y = softmax(relu(x @ w + b)) over [batch, seq, 8] -> [batch, seq, 4], with a reshape through the dims."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["t"], name="bias"),
        helper.make_node("Relu", ["t"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["s"], name="shape"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=2),
        helper.make_node("Softmax", ["f"], ["sm"], name="softmax", axis=-1),
        helper.make_node("Reshape", ["sm", "s"], ["y"], name="back"),
    ]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])], [w, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _x(b: int, s: int) -> np.ndarray:
    return np.random.default_rng(b * 100 + s).standard_normal((b, s, 8)).astype(np.float32)


def _ref(x: np.ndarray) -> np.ndarray:
    return kiln.run_reference(_dynamic_model(), {"x": x})["y"]


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="precision"):
        BuilderConfig(precision="fp12")
    with pytest.raises(ConfigError, match="opt_level"):
        BuilderConfig(opt_level=9)
    with pytest.raises(ConfigError, match="device"):
        BuilderConfig(device="tpu")
    with pytest.raises(ConfigError, match="needs a GPU"):
        BuilderConfig(precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        BuilderConfig(profiles=[{"x": ((4, 1, 8), (2, 1, 8), (8, 1, 8))}])


def test_dynamic_model_without_profile_says_what_to_give() -> None:
    with pytest.raises(ConfigError) as e:
        kiln.build(_dynamic_model())
    assert "input 'x'" in str(e.value) and "--shapes x:1x1x8" in str(e.value)


def test_profile_errors_name_the_input() -> None:
    with pytest.raises(ConfigError, match="names input 'z'"):
        kiln.build(_dynamic_model(), BuilderConfig(profiles=[{"z": (1, 2, 8)}]))
    with pytest.raises(ConfigError, match="dim 2 is fixed at 8"):
        kiln.build(_dynamic_model(), BuilderConfig(profiles=[{"x": (1, 2, 9)}]))


def test_two_profiles_inside_and_outside() -> None:
    cfg = BuilderConfig(profiles=[{"x": ((1, 1, 8), (2, 4, 8), (4, 8, 8))},
                                  {"x": ((8, 16, 8), (16, 32, 8), (16, 64, 8))}])
    ctx = kiln.build(_dynamic_model(), cfg).create_context()
    for shape, profile in [((1, 1), 0), ((3, 7), 0), ((4, 8), 0), ((8, 16), 1), ((16, 64), 1)]:
        x = _x(*shape)
        np.testing.assert_allclose(ctx.run({"x": x})["y"], _ref(x), rtol=1e-5, atol=1e-6)
        assert ctx.last_profile == profile
    with pytest.raises(InputError, match="no optimization profile covers") as e:
        ctx.run({"x": _x(5, 8)})
    assert "profile 0" in str(e.value) and "profile 1" in str(e.value)


def test_arena_is_planned_and_reused_safely() -> None:
    engine = kiln.build(_dynamic_model(), BuilderConfig(profiles=[{"x": ((1, 1, 8), (2, 4, 8), (4, 8, 8))}]))
    mem = engine.plan.memory
    assert 0 < mem.arena_bytes <= mem.naive_bytes
    ctx = engine.create_context()
    first = ctx.run({"x": _x(4, 8)})["y"]
    ctx.run({"x": _x(2, 3)})  # reuses the arena; must not disturb what the first call returned
    np.testing.assert_allclose(first, _ref(_x(4, 8)), rtol=1e-5, atol=1e-6)


def test_slots_of_values_alive_together_never_overlap() -> None:
    from kiln.ir.interpreter import last_uses

    engine = kiln.build(_dynamic_model(), BuilderConfig(profiles=[{"x": ((1, 1, 8), (2, 4, 8), (4, 8, 8))}]))
    g, slots = engine.graph, engine.plan.memory.slots
    last = last_uses(g)
    life = {v.name: (i, last.get(v, i)) for i, n in enumerate(g.nodes) for v in n.outputs if v.name in slots}
    names = sorted(life)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (s1, e1), (s2, e2) = life[a], life[b]
            if s1 <= e2 and s2 <= e1:
                ra, rb = slots[a], slots[b]
                assert ra.offset + ra.nbytes <= rb.offset or rb.offset + rb.nbytes <= ra.offset, (a, b)


def test_memory_limit() -> None:
    from kiln.build.builder import MemoryLimitError

    with pytest.raises(MemoryLimitError, match="over the limit"):
        kiln.build(_dynamic_model(), BuilderConfig(profiles=[{"x": ((1, 1, 8), (2, 4, 8), (64, 64, 8))}],
                                                   memory_limit_bytes=1024))


def test_deterministic_builds_are_byte_identical(tmp_path: Path) -> None:
    cache = tmp_path / "t.cache"
    cfg = dict(profiles=[{"x": ((1, 1, 8), (2, 4, 8), (4, 8, 8))}], timing_cache=str(cache), deterministic=True)
    kiln.build(_dynamic_model(), BuilderConfig(**cfg)).save(tmp_path / "warm.kiln")  # fills the cache
    a = kiln.build(_dynamic_model(), BuilderConfig(**cfg)).to_bytes()
    b = kiln.build(_dynamic_model(), BuilderConfig(**cfg)).to_bytes()
    assert a == b
    c = kiln.build(_dynamic_model(), BuilderConfig(profiles=cfg["profiles"])).to_bytes()
    assert c != a  # a non-deterministic build records when and how long it was built


def test_torch_tensors_in_torch_out() -> None:
    import torch

    ctx = kiln.build(_dynamic_model(), BuilderConfig(profiles=[{"x": (2, 3, 8)}])).create_context()
    out = ctx.run({"x": torch.from_numpy(_x(2, 3))})
    assert isinstance(out["y"], torch.Tensor)
    np.testing.assert_allclose(out["y"].numpy(), _ref(_x(2, 3)), rtol=1e-5, atol=1e-6)


def test_contexts_share_one_engine() -> None:
    engine = kiln.build(_dynamic_model(), BuilderConfig(profiles=[{"x": ((1, 1, 8), (2, 4, 8), (4, 8, 8))}]))
    a, b = engine.create_context(), engine.create_context()
    xa, xb = _x(1, 2), _x(4, 8)
    ya, yb = a.run({"x": xa})["y"], b.run({"x": xb})["y"]
    np.testing.assert_allclose(ya, _ref(xa), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yb, _ref(xb), rtol=1e-5, atol=1e-6)
    w = engine.graph.initializers["w"].data
    assert all(ctx.engine.graph.initializers["w"].data is w for ctx in (a, b))


def _matmul_model() -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 64])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_time_budget_and_opt_level_bound_the_timing() -> None:
    tuned = kiln.build(_matmul_model(), BuilderConfig(opt_level=3)).plan.stats["tuning"]
    assert tuned["candidates_timed"] >= 2  # MatMul has several CPU tactics besides the reference
    spent = tuned["tactic_seconds"]  # where the build's time went, per tactic: [building, timing]
    assert "reference" in spent and len(spent) >= 2 and spent["reference"][1] > 0
    assert all(a >= 0 and b >= 0 for a, b in spent.values())  # a candidate that fails is never timed
    for cfg in (BuilderConfig(time_budget_s=0.0), BuilderConfig(opt_level=0)):
        stats = kiln.build(_matmul_model(), cfg).plan.stats["tuning"]
        assert stats["candidates_timed"] == 0
