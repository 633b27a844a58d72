"""Sequences and optionals: inference (element types, fresh dims, unknown rank) and execution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import OptionalType, SequenceType
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ExecutionError, ShapeError

F = DType.FLOAT32


def _pos(g: Graph, p: int) -> object:
    return g.add_initializer("pos", torch.tensor(p, dtype=torch.int64))


def test_construct_joins_element_types() -> None:
    g = Graph()
    a, b = g.add_input("a", TensorType(F, ("N", 3))), g.add_input("b", TensorType(F, ("N", 4)))
    (s,) = g.add("SequenceConstruct", [a, b], outputs=1)
    assert isinstance(s.type, SequenceType) and isinstance(s.type.elem, TensorType)
    shape = s.type.elem.shape
    assert shape is not None and shape[0] == "N" and isinstance(shape[1], str)
    c = g.add_input("c", TensorType(DType.INT64, ("N", 3)))
    with pytest.raises(ShapeError, match="different element types"):
        g.add("SequenceConstruct", [a, c], outputs=1)


def test_sequence_at_gives_fresh_symbols_for_element_dims() -> None:
    g = Graph()
    s = g.add_input("s", SequenceType(TensorType(F, ("N", 3))))
    (x,) = g.add("SequenceAt", [s, _pos(g, -1)], outputs=["x"])  # type: ignore[list-item]
    assert x.shape is not None and x.shape[1] == 3 and x.shape[0] != "N"
    g.outputs = [x]
    # Elements of one sequence may differ in the symbolic dim: no clash with another binding of N.
    out = Interpreter(g).run({"s": [np.zeros((2, 3), np.float32), np.ones((5, 3), np.float32)]})
    np.testing.assert_array_equal(out["x"], np.ones((5, 3)))


def test_insert_erase_length_and_positions() -> None:
    g = Graph()
    s = g.add_input("s", SequenceType(TensorType(DType.INT64, None)))
    t = g.add_input("t", TensorType(DType.INT64, (2,)))
    (ins,) = g.add("SequenceInsert", [s, t, _pos(g, -1)], outputs=1)  # type: ignore[list-item]
    (era,) = g.add("SequenceErase", [ins], outputs=1)
    (n,) = g.add("SequenceLength", [era], outputs=["n"])
    assert n.type == TensorType(DType.INT64, ())
    g.outputs = [ins, n]
    seq = [np.array([1]), np.array([2, 3, 4])]
    out = Interpreter(g).run({"s": seq, "t": np.array([7, 8])})
    assert [x.tolist() for x in out[g.outputs[0].name]] == [[1], [7, 8], [2, 3, 4]]
    assert int(out["n"]) == 2
    assert [x.tolist() for x in seq] == [[1], [2, 3, 4]]  # the input list is not mutated


def test_positions_out_of_range_fail_clearly() -> None:
    g = Graph()
    s = g.add_input("s", SequenceType(TensorType(F, None)))
    g.outputs = g.add("SequenceAt", [s, _pos(g, 2)], outputs=1)  # type: ignore[list-item]
    with pytest.raises(ExecutionError, match="position 2 is out of range for a sequence of 2"):
        Interpreter(g).run({"s": [np.zeros(1, np.float32)] * 2})


def test_position_must_be_an_integer_scalar() -> None:
    g = Graph()
    s = g.add_input("s", SequenceType(TensorType(F, None)))
    p = g.add_input("p", TensorType(F, ()))
    with pytest.raises(ShapeError, match="position must be int32 or int64"):
        g.add("SequenceAt", [s, p], outputs=1)


def test_sequence_empty_and_insert_into_it() -> None:
    g = Graph()
    (e,) = g.add("SequenceEmpty", [], {"dtype": DType.INT32}, outputs=1)
    assert e.type == SequenceType(TensorType(DType.INT32, None))
    f = g.add_input("f", TensorType(F, (2,)))
    with pytest.raises(ShapeError, match="cannot insert a float32 tensor into a sequence of int32"):
        g.add("SequenceInsert", [e, f], outputs=1)


@pytest.mark.parametrize(("split", "keepdims", "elem"), [
    (None, 1, (2, 1)), (None, 0, (2,)), (2, 1, (2, 2)), (4, 1, (2, "?")), ([2, 4], 1, (2, "?")),
    ([3, 3], 1, (2, 3)),
])
def test_split_to_sequence_element_type(split: object, keepdims: int, elem: tuple) -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F, (2, 6)))
    ins = [x] if split is None else [x, g.add_initializer("split", torch.tensor(split))]
    (s,) = g.add("SplitToSequence", ins, {"axis": -1, "keepdims": keepdims}, outputs=1)
    assert isinstance(s.type, SequenceType) and isinstance(s.type.elem, TensorType)
    got = s.type.elem.shape
    assert got is not None and len(got) == len(elem)
    for a, b in zip(got, elem):
        assert a == b if b != "?" else isinstance(a, str)
    g.outputs = [s]
    data = np.arange(12, dtype=np.float32).reshape(2, 6)
    parts = Interpreter(g).run({"x": data})[s.name]
    if split is None:
        want = [data[:, i:i + 1] if keepdims else data[:, i] for i in range(6)]
    else:
        cuts = np.cumsum(split if isinstance(split, list) else [split] * (6 // split + 1))[:-1]
        want = [p for p in np.split(data, [c for c in cuts if c < 6], axis=1) if p.size]
    assert len(parts) == len(want)
    for p, w in zip(parts, want):
        np.testing.assert_array_equal(p, w)


def test_split_to_sequence_unknown_rank_and_bad_split() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F, None))
    (s,) = g.add("SplitToSequence", [x], outputs=1)
    assert s.type == SequenceType(TensorType(F, None))
    y = g.add_input("y", TensorType(F, (6,)))
    g.outputs = g.add("SplitToSequence", [y, g.add_initializer("sp", torch.tensor([2, 3]))], outputs=1)
    with pytest.raises(ExecutionError, match="do not add up"):
        Interpreter(g).run({"x": np.zeros(1, np.float32), "y": np.zeros(6, np.float32)})


def test_concat_from_sequence() -> None:
    g = Graph()
    s = g.add_input("s", SequenceType(TensorType(F, (2, "K"))))
    (cat,) = g.add("ConcatFromSequence", [s], {"axis": 1}, outputs=["cat"])
    (stk,) = g.add("ConcatFromSequence", [s], {"axis": -1, "new_axis": 1}, outputs=["stk"])
    assert cat.shape is not None and cat.shape[0] == 2 and isinstance(cat.shape[1], str)
    assert stk.shape is not None and len(stk.shape) == 3 and stk.shape[0] == 2
    g.outputs = [cat, stk]
    a, b = np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32)
    out = Interpreter(g).run({"s": [a, b]})
    np.testing.assert_array_equal(out["cat"], np.concatenate([a, b], axis=1))
    np.testing.assert_array_equal(out["stk"], np.stack([a, b], axis=-1))
    with pytest.raises(ExecutionError, match="the sequence is empty"):
        Interpreter(g).run({"s": []})


def test_concat_from_sequence_axis_is_checked() -> None:
    g = Graph()
    s = g.add_input("s", SequenceType(TensorType(F, (2, 3))))
    with pytest.raises(ShapeError, match="axis 2 is out of range"):
        g.add("ConcatFromSequence", [s], {"axis": 2}, outputs=1)
    (ok,) = g.add("ConcatFromSequence", [s], {"axis": 2, "new_axis": 1}, outputs=1)
    assert ok.shape is not None and ok.shape[:2] == (2, 3)


def test_sequence_map_over_sequences_and_a_tensor() -> None:
    body = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["o"]), helper.make_node("Shape", ["a"], ["shp"])], "body",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("shp", TensorProto.INT64, [1])],
    )
    node = helper.make_node("SequenceMap", ["xs", "t"], ["ys", "shapes"], body=body)
    graph = helper.make_graph(
        [node], "m",
        [helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])],
        [helper.make_tensor_sequence_value_info("ys", TensorProto.FLOAT, None),
         helper.make_tensor_sequence_value_info("shapes", TensorProto.INT64, None)],
    )
    g = import_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    xs = [np.arange(3, dtype=np.float32), np.arange(5, dtype=np.float32)]
    out = Interpreter(g).run({"xs": xs, "t": np.array([10], np.float32)})
    assert [y.tolist() for y in out["ys"]] == [[10, 11, 12], [10, 11, 12, 13, 14]]
    assert [s.tolist() for s in out["shapes"]] == [[3], [5]]


def _optional_graph(get: bool) -> Graph:
    g = Graph()
    x = g.add_input("x", OptionalType(TensorType(F, (4,))))
    (has,) = g.add("OptionalHasElement", [x], outputs=["has"])
    (none,) = g.add("OptionalHasElement", [], outputs=["none"])
    (empty,) = g.add("Optional", [], {"type": SequenceType(TensorType(F, None))}, outputs=["empty"])
    assert has.type == TensorType(DType.BOOL, ())
    assert empty.type == OptionalType(SequenceType(TensorType(F, None)))
    g.outputs = [has, none, empty]
    if get:
        (got,) = g.add("OptionalGetElement", [x], outputs=["got"])
        assert got.type == TensorType(F, (4,))
        g.outputs.append(got)
    return g


def test_optional_ops() -> None:
    out = Interpreter(_optional_graph(get=False)).run({"x": None})
    assert not out["has"] and not out["none"] and out["empty"] is None
    out = Interpreter(_optional_graph(get=True)).run({"x": np.ones(4, np.float32)})
    assert bool(out["has"]) and out["got"].tolist() == [1, 1, 1, 1]
    with pytest.raises(ExecutionError, match="the optional is empty"):
        Interpreter(_optional_graph(get=True)).run({"x": None})


def test_optional_needs_a_type_or_an_input() -> None:
    g = Graph()
    with pytest.raises(ShapeError, match="needs the 'type' attribute"):
        g.add("Optional", [], outputs=1)
    x = g.add_input("x", OptionalType(TensorType(F, None)))
    with pytest.raises(ShapeError, match="already optional"):
        g.add("Optional", [x], outputs=1)
