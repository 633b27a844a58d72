"""If, Loop and Scan: type joins, body import with widening, and execution against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import OptionalType, SequenceType
from kiln.ir.interpreter import Interpreter
from kiln.ir.ops.control import join_type
from kiln.utils.errors import ExecutionError, ShapeError, UnsupportedError

F = DType.FLOAT32
_fresh_names = iter(f"f{i}" for i in range(1000))


def _fresh() -> str:
    return next(_fresh_names)


def _model(nodes: list, inputs: list, outputs: list, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "m", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name: str, elem: int, shape: list | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


# --- type joins ---------------------------------------------------------------------------------------


def test_join_keeps_agreeing_dims_and_freshens_the_rest() -> None:
    t = join_type(TensorType(F, ("N", 3, 4)), TensorType(F, ("N", 5, 4)), _fresh)
    assert isinstance(t, TensorType) and t.shape is not None
    assert t.shape[0] == "N" and t.shape[2] == 4 and isinstance(t.shape[1], str) and t.shape[1] != "N"


def test_join_of_ranks_and_kinds() -> None:
    assert join_type(TensorType(F, (2,)), TensorType(F, (2, 3)), _fresh) == TensorType(F, None)
    assert join_type(TensorType(F, None), TensorType(F, (2,)), _fresh) == TensorType(F, None)
    seq = SequenceType(TensorType(F, (2,)))
    assert join_type(OptionalType(seq), seq, _fresh) == OptionalType(seq)
    with pytest.raises(ShapeError, match="different element types"):
        join_type(TensorType(F, (2,)), TensorType(DType.INT64, (2,)), _fresh)
    with pytest.raises(ShapeError, match="cannot hold the same value"):
        join_type(TensorType(F, (2,)), SequenceType(TensorType(F, (2,))), _fresh)


# --- If -----------------------------------------------------------------------------------------------


def _if_graph(cond_const: bool | None = None) -> tuple[Graph, Graph, Graph]:
    g = Graph()
    x = g.add_input("x", TensorType(F, ("N", 3)))
    y = g.add_input("y", TensorType(F, ("N", 5)))
    if cond_const is None:
        cond = g.add_input("cond", TensorType(DType.BOOL, ()))
    else:
        cond = g.add_initializer("cond", torch.tensor(cond_const))
    then_g, else_g = Graph("then", parent=g), Graph("else", parent=g)
    then_g.outputs = then_g.add("Add", [x, x])
    else_g.outputs = else_g.add("Identity", [y])
    out = g.add("If", [cond], {"then_branch": then_g, "else_branch": else_g}, outputs=["out"])
    g.outputs = out
    return g, then_g, else_g


def test_if_inference_joins_the_branches() -> None:
    g, _, _ = _if_graph()
    shape = g.outputs[0].shape
    assert shape is not None and shape[0] == "N" and isinstance(shape[1], str) and shape[1] != "N"


def test_if_with_constant_cond_takes_the_branch_type() -> None:
    g, _, _ = _if_graph(cond_const=False)
    assert g.outputs[0].shape == ("N", 5)


def test_if_runs_the_chosen_branch_reading_outer_values() -> None:
    g, _, _ = _if_graph()
    x, y = np.ones((2, 3), np.float32), np.full((2, 5), 7, np.float32)
    out = Interpreter(g).run({"x": x, "y": y, "cond": np.array(True)})
    np.testing.assert_array_equal(out["out"], x + x)
    out = Interpreter(g).run({"x": x, "y": y, "cond": np.array(False)})
    np.testing.assert_array_equal(out["out"], y)


def test_if_branch_dtypes_must_agree() -> None:
    g = Graph()
    cond = g.add_input("cond", TensorType(DType.BOOL, ()))
    a, b = Graph("a", parent=g), Graph("b", parent=g)
    a.outputs = [a.add_initializer("one", torch.ones(2))]
    b.outputs = [b.add_initializer("two", torch.ones(2, dtype=torch.int64))]
    with pytest.raises(ShapeError, match="branches' outputs disagree"):
        g.add("If", [cond], {"then_branch": a, "else_branch": b}, outputs=1)


def test_if_unknown_rank_branch() -> None:
    g = Graph()
    cond = g.add_input("cond", TensorType(DType.BOOL, ()))
    x = g.add_input("x", TensorType(F, None))
    a, b = Graph("a", parent=g), Graph("b", parent=g)
    a.outputs = a.add("Identity", [x])
    b.outputs = b.add("Relu", [x])
    (out,) = g.add("If", [cond], {"then_branch": a, "else_branch": b}, outputs=1)
    assert out.shape is None


def test_if_import_rejects_unknown_attribute() -> None:
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [], [_vi("o", 1, [2])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, extra=1)
    m = _model([node], [_vi("c", TensorProto.BOOL, []), _vi("x", 1, [2])], [_vi("y", 1, [2])])
    with pytest.raises(UnsupportedError, match="attribute 'extra'"):
        import_model(m)


# --- Loop ---------------------------------------------------------------------------------------------


def _growing_loop(with_cond: bool) -> onnx.ModelProto:
    """Carries a tensor that gains a row per iteration; with_cond: stops at `limit` rows."""
    body_nodes = [
        helper.make_node("Concat", ["acc_in", "row"], ["acc_out"], axis=0),
        helper.make_node("Add", ["total_in", "i_f"], ["total_out"]),
        helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["total_out"], ["scan"]),
    ]
    if with_cond:
        body_nodes += [
            helper.make_node("Shape", ["acc_out"], ["shape"], start=0, end=1),
            helper.make_node("Less", ["shape", "limit"], ["less"]),
            helper.make_node("Squeeze", ["less"], ["cond_out"]),
        ]
    else:
        body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body = helper.make_graph(
        body_nodes, "body",
        [_vi("i", TensorProto.INT64, []), _vi("cond_in", TensorProto.BOOL, []), _vi("acc_in", 1, [1, 2]),
         _vi("total_in", 1, [])],
        [_vi("cond_out", TensorProto.BOOL, []), _vi("acc_out", 1, None), _vi("total_out", 1, []),
         _vi("scan", 1, [])],
    )
    loop = helper.make_node("Loop", ["M", "c0" if with_cond else "", "acc0", "t0"],
                            ["acc", "total", "scans"], body=body)
    inputs = [_vi("M", TensorProto.INT64, []), _vi("acc0", 1, [1, 2]), _vi("t0", 1, []),
              _vi("row", 1, [1, 2])]
    if with_cond:
        inputs += [_vi("c0", TensorProto.BOOL, []), _vi("limit", TensorProto.INT64, [1])]
    return _model([loop], inputs, [_vi("acc", 1, None), _vi("total", 1, None), _vi("scans", 1, None)])


def test_loop_widens_a_growing_carried_value_and_runs() -> None:
    g = import_model(_growing_loop(with_cond=False))
    loop = g.outputs[0].producer
    assert loop is not None and loop.op == "Loop"
    body = loop.attrs["body"]
    acc_in = body.inputs[2].shape
    assert acc_in is not None and isinstance(acc_in[0], str) and acc_in[1] == 2  # the row count was widened
    acc_t = g.outputs[0].shape
    assert acc_t is not None and isinstance(acc_t[0], str) and acc_t[1] == 2
    assert isinstance(g.outputs[2].shape[0], str)  # type: ignore[index]  # M is not constant
    acc0, row = np.zeros((1, 2), np.float32), np.ones((1, 2), np.float32)
    out = Interpreter(g).run({"M": np.array(4), "acc0": acc0, "t0": np.array(0.5, np.float32), "row": row})
    np.testing.assert_array_equal(out["acc"], np.concatenate([acc0] + [row] * 4))
    np.testing.assert_allclose(out["scans"], [0.5, 1.5, 3.5, 6.5])
    np.testing.assert_allclose(out["total"], 6.5)


def test_loop_with_a_data_dependent_condition() -> None:
    g = import_model(_growing_loop(with_cond=True))
    feeds = {"M": np.array(100), "acc0": np.zeros((1, 2), np.float32), "t0": np.array(0, np.float32),
             "row": np.ones((1, 2), np.float32), "c0": np.array(True), "limit": np.array([3])}
    out = Interpreter(g).run(feeds)
    assert out["acc"].shape == (3, 2) and out["scans"].shape == (2,)
    feeds["c0"] = np.array(False)  # no iteration at all: initial values, empty scan output
    out = Interpreter(g).run(feeds)
    assert out["acc"].shape == (1, 2) and out["scans"].shape == (0,) and out["scans"].dtype == np.float32


def test_loop_with_constant_trip_count_has_a_static_scan_length() -> None:
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Add", ["x", "x"], ["x2"]),
         helper.make_node("Identity", ["x2"], ["row"])],
        "body", [_vi("i", TensorProto.INT64, []), _vi("c", TensorProto.BOOL, []), _vi("x", 1, [3])],
        [_vi("c_out", TensorProto.BOOL, []), _vi("x2", 1, [3]), _vi("row", 1, [3])],
    )
    m = helper.make_tensor("M", TensorProto.INT64, [], [3])
    g = helper.make_graph([helper.make_node("Loop", ["M", "", "x0"], ["y", "s"], body=body)], "m",
                          [_vi("x0", 1, [3])], [_vi("y", 1, None), _vi("s", 1, None)], initializer=[m])
    kg = import_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert kg.outputs[0].shape == (3,) and kg.outputs[1].shape == (3, 3)
    out = Interpreter(kg).run({"x0": np.ones(3, np.float32)})
    np.testing.assert_array_equal(out["s"], [[2] * 3, [4] * 3, [8] * 3])


def test_loop_carried_dtype_change_is_refused() -> None:
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Cast", ["x"], ["y"], to=7)],
        "body", [_vi("i", TensorProto.INT64, []), _vi("c", TensorProto.BOOL, []), _vi("x", 1, [3])],
        [_vi("c_out", TensorProto.BOOL, []), _vi("y", 7, [3])],
    )
    m = _model([helper.make_node("Loop", ["M", "", "x0"], ["y"], body=body)],
               [_vi("M", TensorProto.INT64, []), _vi("x0", 1, [3])], [_vi("y", 1, None)])
    with pytest.raises(UnsupportedError, match="float32 going in and int64 coming out"):
        import_model(m)


def test_loop_body_arity_is_checked() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F, (2,)))
    body = Graph("body", parent=g)
    body.add_input("i", TensorType(DType.INT64, ()))
    body.outputs = []
    with pytest.raises(ShapeError, match="the body takes 1 inputs"):
        g.add("Loop", [None, None, x], {"body": body}, outputs=1)


# --- Scan ---------------------------------------------------------------------------------------------


def _scan_model(opset: int, **attrs: object) -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Add", ["st", "x"], ["st_out"]), helper.make_node("Identity", ["st_out"], ["y"])],
        "body", [_vi("st", 1, [2]), _vi("x", 1, [2])], [_vi("st_out", 1, [2]), _vi("y", 1, [2])],
    )
    if opset == 8:
        node = helper.make_node("Scan", ["", "s0", "xs"], ["s", "ys"], body=body, num_scan_inputs=1, **attrs)
        ins = [_vi("s0", 1, ["B", 2]), _vi("xs", 1, ["B", "T", 2])]
    else:
        node = helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], body=body, num_scan_inputs=1, **attrs)
        ins = [_vi("s0", 1, [2]), _vi("xs", 1, [2, "T"])]
    return _model([node], ins, [_vi("s", 1, None), _vi("ys", 1, None)], opset=opset)


def test_scan9_axes_and_directions() -> None:
    m = _scan_model(11, scan_input_axes=[1], scan_input_directions=[1], scan_output_axes=[-1],
                    scan_output_directions=[1])
    g = import_model(m)
    assert g.outputs[1].shape == (2, "T")
    xs = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = Interpreter(g).run({"s0": np.zeros(2, np.float32), "xs": xs})
    # reversed input: partial sums from the back; reversed output: written back to front.
    partial = np.cumsum(xs[:, ::-1], axis=1)
    np.testing.assert_array_equal(out["ys"], partial[:, ::-1])
    np.testing.assert_array_equal(out["s"], xs.sum(axis=1))


def test_scan8_batches_become_an_outer_scan() -> None:
    g = import_model(_scan_model(8, directions=[0]))
    assert g.outputs[1].shape == ("B", "T", 2)
    xs = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    out = Interpreter(g).run({"s0": np.ones((2, 2), np.float32), "xs": xs})
    np.testing.assert_array_equal(out["ys"], 1 + np.cumsum(xs, axis=1))
    np.testing.assert_array_equal(out["s"], 1 + xs.sum(axis=1))


def test_scan8_refuses_partial_sequence_lens() -> None:
    m = _scan_model(8)
    m.graph.node[0].input[0] = "lens"
    m.graph.input.append(_vi("lens", TensorProto.INT32, ["B"]))
    with pytest.raises(UnsupportedError, match="sequence_lens"):
        import_model(m)


def test_scan_attribute_lengths_are_checked() -> None:
    with pytest.raises(UnsupportedError, match="scan_input_axes has 2 entries"):
        import_model(_scan_model(11, scan_input_axes=[0, 0]))
    with pytest.raises(ShapeError, match="scan_output_directions entries must be 0 or 1"):
        import_model(_scan_model(11, scan_output_directions=[2]))


def test_scan_with_no_iterations_gives_empty_outputs() -> None:
    g = import_model(_scan_model(11, scan_input_axes=[1]))
    out = Interpreter(g).run({"s0": np.full(2, 3, np.float32), "xs": np.zeros((2, 0), np.float32)})
    assert out["ys"].shape == (0, 2)
    np.testing.assert_array_equal(out["s"], [3, 3])


def test_scan_inputs_of_different_lengths_fail_at_run_time() -> None:
    g = Graph()
    s = g.add_input("s", TensorType(F, (2,)))
    a, b = g.add_input("a", TensorType(F, ("T", 2))), g.add_input("b", TensorType(F, ("U", 2)))
    body = Graph("body", parent=g)
    bs, ba, bb = (body.add_input(n, TensorType(F, (2,))) for n in "sab")
    body.outputs = body.add("Add", [bs, ba])
    _ = bb
    g.outputs = g.add("Scan", [s, a, b], {"body": body, "num_scan_inputs": 2}, outputs=1)
    with pytest.raises(ExecutionError, match="scan input lengths differ"):
        Interpreter(g).run({"s": np.zeros(2, np.float32), "a": np.zeros((3, 2), np.float32),
                            "b": np.zeros((4, 2), np.float32)})
