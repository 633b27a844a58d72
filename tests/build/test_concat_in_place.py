"""Concat elimination: producers write into the Concat output's slot and the Concat step copies nothing."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.kernels.tensor.concat import adjacent_view

RNG = np.random.default_rng(0)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.1).astype(np.float32), name)


def _model(n: int, concat_out_is_output: bool = False) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Conv", ["x", "w2"], ["b"], name="conv_b"),
        helper.make_node("Relu", ["x"], ["c"], name="relu_c"),
        helper.make_node("Concat", ["a", "b", "c"], ["cat"], axis=1, name="cat"),
    ]
    out = "cat"
    if not concat_out_is_output:
        nodes.append(helper.make_node("Sigmoid", ["cat"], ["y"], name="sig"))
        out = "y"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 4, 8, 8])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, [n, 12, 8, 8])],
                          [_init("w1", 4, 4, 3, 3), _init("w2", 4, 4, 1, 1)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _expected(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return next(iter(kiln.run_reference(kiln.import_onnx(m), {"x": x}).values()))


def test_pieces_are_strided_views_of_the_output_slot_and_nothing_is_copied(tmp_path) -> None:
    m = _model(2)  # batch 2: each piece is a strided (not contiguous) part of the output
    engine = kiln.build(m)
    mem = engine.plan.memory
    assert mem.concats_in_place == ["cat"]
    whole = mem.slots["cat"]
    item = 4
    assert [mem.slots[p].offset - whole.offset for p in ("a", "b", "c")] == [0, 4 * 64 * item, 8 * 64 * item]
    assert all(mem.slots[p].strides == (12 * 64, 64, 8, 1) for p in ("a", "b", "c"))
    i = [n.name for n in engine.graph.nodes].index("cat")
    assert engine.plan.choices[0][i].tactic == "concat.in_place"

    ctx = engine.create_context()
    seen: dict[str, torch.Tensor] = {}
    x = RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)
    call = ctx.prepare({"x": x})
    ctx.execute(call.profile, call.env, call.bindings, hook=lambda k, node, outs: seen.update({node.name: outs[0]}))
    arena = ctx.arena().data_ptr()
    assert seen["cat"].data_ptr() == arena + whole.offset
    assert seen["conv_b"].data_ptr() == arena + mem.slots["b"].offset  # the producer wrote in place
    np.testing.assert_allclose(ctx.run({"x": x})["y"], _expected(m, x), rtol=1e-5, atol=1e-6)

    path = tmp_path / "m.kiln"
    engine.save(path)
    again = kiln.load(path)
    assert again.plan.memory.slots["a"] == mem.slots["a"]
    np.testing.assert_allclose(again.create_context().run({"x": x})["y"], _expected(m, x), rtol=1e-5, atol=1e-6)


def test_a_concat_that_is_a_graph_output_is_not_taken() -> None:
    m = _model(1, concat_out_is_output=True)
    engine = kiln.build(m)
    assert engine.plan.memory.concats_in_place == []
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(engine.create_context().run({"x": x})["cat"], _expected(m, x), rtol=1e-5, atol=1e-6)


def test_the_in_place_plan_saves_memory() -> None:
    mem = kiln.build(_model(1)).plan.memory
    assert mem.arena_bytes < mem.naive_bytes


def test_adjacent_view_only_when_the_pieces_really_are_adjacent() -> None:
    out = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    a, b = out[:, :2], out[:, 2:]
    view = adjacent_view([a, b], 1)
    assert view is not None and view.data_ptr() == out.data_ptr() and torch.equal(view, out)
    assert adjacent_view([b, a], 1) is None  # wrong order
    assert adjacent_view([a, torch.zeros(2, 3, 3)], 1) is None  # another storage
    assert adjacent_view([out[:, :2], out[:, 3:]], 1) is None  # a gap
