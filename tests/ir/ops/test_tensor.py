"""Tensor creation, shape manipulation and indexing: symbolic inference, old ONNX versions, dtypes and cases
the ONNX backend suite does not cover (strings, unsigned types, negative pads, dead-branch shapes, ...)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.ir.ops.tensor import shape_values
from kiln.utils.errors import ExecutionError, KilnError, ShapeError, UnsupportedError

INT64_MAX = 2**63 - 1


# --- helpers ------------------------------------------------------------------------------------------


def _graph(*shapes: Any, dtype: DType = DType.FLOAT32) -> tuple[Graph, list]:
    g = Graph()
    return g, [g.add_input(f"x{i}", TensorType(dtype, s)) for i, s in enumerate(shapes)]


def _c(g: Graph, *vals: Any) -> Any:
    return g.add_initializer("c", torch.tensor(vals, dtype=torch.int64))


def _shape(v: Any) -> Any:
    return v.type.shape


def _elem(a: np.ndarray) -> int:
    if a.dtype == object:
        return TensorProto.STRING
    return helper.np_dtype_to_tensor_dtype(a.dtype)


def _onnx_run(op: str, inputs: dict[str, np.ndarray], n_out: int = 1, opset: int = 21,
              consts: dict[str, np.ndarray] | None = None, order: str | None = None,
              **attrs: Any) -> list[np.ndarray]:
    """Import a one-node ONNX model (of `opset`) and run it; `consts` become initializers. The node reads the
    graph inputs then the constants, or the names in `order` (one letter each)."""
    consts = consts or {}
    names = list(order) if order else list(inputs) + list(consts)
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, [n if n else "" for n in names], outs, **attrs)
    g = helper.make_graph(
        [node], "t",
        [helper.make_tensor_value_info(k, _elem(v), v.shape) for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outs],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    out = Interpreter(import_model(m)).run(inputs)
    return [out[o] for o in outs]


# --- symbolic shape inference -------------------------------------------------------------------------


def test_reshape_copies_zero_dims_and_solves_minus_one_symbolically() -> None:
    g, (x,) = _graph(("batch", "seq", 384))
    (y,) = g.add("Reshape", [x, _c(g, 0, 0, 6, 64)])
    assert _shape(y) == ("batch", "seq", 6, 64)
    (y,) = g.add("Reshape", [x, _c(g, 0, -1, 64)])
    assert _shape(y) == ("batch", "6*seq", 64)
    (y,) = g.add("Reshape", [x, _c(g, -1, 384)])
    assert _shape(y) == ("batch*seq", 384)


def test_reshape_follows_shape_arithmetic() -> None:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape keeps the symbols (how exporters write reshapes)."""
    g, (x,) = _graph(("batch", "seq", 384))
    (s,) = g.add("Shape", [x])
    (b,) = g.add("Gather", [s, g.add_initializer("i", torch.tensor(0))])
    (n,) = g.add("Gather", [s, g.add_initializer("i", torch.tensor([1]))])
    (b1,) = g.add("Unsqueeze", [b, _c(g, 0)])
    (twice,) = g.add("Mul", [n, g.add_initializer("two", torch.tensor([2]))])
    (shape,) = g.add("Concat", [b1, twice, _c(g, -1)], {"axis": 0})
    assert shape_values(shape) == ["batch", "2*seq", -1]
    (y,) = g.add("Reshape", [x, shape])
    assert _shape(y) == ("batch", "2*seq", 192)
    g.outputs = [y]
    (out,) = Interpreter(g).run([np.zeros((2, 3, 384), "f")])
    assert out.shape == (2, 6, 192)


def test_reshape_with_computed_shape_gives_fresh_dims_of_the_right_rank() -> None:
    g, (x, s) = _graph(("a", 4), (3,))
    s.type = TensorType(DType.INT64, (3,))
    (y,) = g.add("Reshape", [x, s])
    assert len(_shape(y)) == 3 and all(isinstance(d, str) for d in _shape(y))


def test_reshape_rejects_bad_shapes() -> None:
    g, (x,) = _graph((2, 3))
    with pytest.raises(ShapeError, match="more than one -1"):
        g.add("Reshape", [x, _c(g, -1, -1)])
    with pytest.raises(ShapeError, match="cannot reshape"):
        g.add("Reshape", [x, _c(g, 4, -1)])
    with pytest.raises(ShapeError, match="element counts differ"):
        g.add("Reshape", [x, _c(g, 7)])


@pytest.mark.parametrize(("start", "end", "step", "want"), [
    (0, INT64_MAX, 1, "seq"), (1, INT64_MAX, 1, "seq-1"), (-1, INT64_MAX, 1, 1), (0, -1, 1, "seq-1"),
    (0, 5, 1, "Min(5,seq)"), (-1, -INT64_MAX, -1, "seq"), (INT64_MAX, -INT64_MAX, -1, "seq"),
])
def test_slice_on_symbolic_dims(start: int, end: int, step: int, want: Any) -> None:
    g, (x,) = _graph(("batch", "seq", 8))
    (y,) = g.add("Slice", [x, _c(g, start), _c(g, end), _c(g, 1), _c(g, step)])
    assert _shape(y) == ("batch", want, 8)


def test_slice_static_matches_numpy() -> None:
    x = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    for starts, ends, axes, steps in [([0, -1], [2, -5], [1, 2], [1, -2]), ([10], [-10], [0], [-1]),
                                      ([-100], [100], [-1], [3]), ([2], [1], [2], [1])]:
        consts = {"s": np.array(starts), "e": np.array(ends), "a": np.array(axes), "t": np.array(steps)}
        (y,) = _onnx_run("Slice", {"x": x}, consts=consts)
        idx = [slice(None)] * 3
        for s, e, a, t in zip(starts, ends, axes, steps):
            idx[a] = slice(s, e, t)
        np.testing.assert_array_equal(y, x[tuple(idx)])


def test_concat_sums_symbolic_dims_and_checks_others() -> None:
    g, (a, b) = _graph(("n", "s"), ("n", 3))
    (y,) = g.add("Concat", [a, b, b], {"axis": -1})
    assert _shape(y) == ("n", "s+6")
    g2, (p, q) = _graph((2, 3), (4, 3))
    with pytest.raises(ShapeError, match="differ in dim 0"):
        g2.add("Concat", [p, q], {"axis": 1})


def test_expand_tile_pad_constant_of_shape_range_on_symbols() -> None:
    g, (x, z) = _graph(("b", "s", 384), ("s", 1))
    (s,) = g.add("Shape", [x])
    (y,) = g.add("Expand", [z, s])
    assert _shape(y) == ("b", "s", 384)
    (y,) = g.add("Tile", [x, _c(g, 2, 1, 3)])
    assert _shape(y) == ("2*b", "s", 1152)
    (y,) = g.add("Pad", [x, _c(g, 0, 1, 0, 0, 2, 0)])
    assert _shape(y) == ("b", "s+3", 384)
    (y,) = g.add("ConstantOfShape", [s], {"value": torch.tensor([7], dtype=torch.int32)})
    assert y.type == TensorType(DType.INT32, ("b", "s", 384))
    (n,) = g.add("Gather", [s, g.add_initializer("i", torch.tensor(1))])
    zero, two = g.add_initializer("z", torch.tensor(0)), g.add_initializer("o", torch.tensor(2))
    (y,) = g.add("Range", [zero, n, two])
    assert _shape(y) == ("floor(s/2+1/2)",)


def test_unknown_rank_does_not_crash() -> None:
    g, (x,) = _graph(None)
    two = _c(g, 0, 1)
    for op, ins, attrs in [("Reshape", [x, _c(g, 0, -1)], {}), ("Transpose", [x], {}), ("Squeeze", [x], {}),
                           ("Unsqueeze", [x, _c(g, 0)], {}), ("Slice", [x, two, two], {}),
                           ("Gather", [x, _c(g, 0)], {}), ("Expand", [x, _c(g, 2, 2)], {}),
                           ("Tile", [x, two], {}), ("Pad", [x, _c(g, 1, 1)], {}), ("TopK", [x, _c(g, 1)], {}),
                           ("ArgMax", [x], {}), ("Concat", [x, x], {"axis": 0}),
                           ("DepthToSpace", [x], {"blocksize": 2}),
                           ("Compress", [x, g.add_initializer("c", torch.tensor([True]))], {"axis": 0})]:
        (y, *_) = g.add(op, ins, attrs)
        assert y.type.rank is None or all(isinstance(d, (int, str)) for d in _shape(y))
    (f,) = g.add("Flatten", [x])
    assert len(_shape(f)) == 2
    (s,) = g.add("Shape", [x])
    assert len(_shape(s)) == 1 and isinstance(_shape(s)[0], str)
    (nz,) = g.add("NonZero", [x])
    assert len(_shape(nz)) == 2


def test_squeeze_and_unsqueeze() -> None:
    g, (x,) = _graph(("n", 1, 3, 1))
    (y,) = g.add("Squeeze", [x, _c(g, 1, -1)])
    assert _shape(y) == ("n", 3)
    (y,) = g.add("Squeeze", [x])
    assert _shape(y) is None  # whether n is 1 is unknown
    (y,) = g.add("Unsqueeze", [x, _c(g, -1, 0)])
    assert _shape(y) == (1, "n", 1, 3, 1, 1)
    with pytest.raises(ShapeError, match="cannot squeeze axis 2"):
        g.add("Squeeze", [x, _c(g, 2)])
    with pytest.raises(ShapeError, match="repeat"):
        g.add("Unsqueeze", [x, _c(g, 0, -6)])


def test_split_shapes() -> None:
    g, (x,) = _graph(("n", 7))
    ys = g.add("Split", [x], {"axis": 1, "num_outputs": 3}, outputs=3)
    assert [_shape(y) for y in ys] == [("n", 3), ("n", 3), ("n", 1)]
    ys = g.add("Split", [x, _c(g, 2, 5)], {"axis": -1}, outputs=2)
    assert [_shape(y) for y in ys] == [("n", 2), ("n", 5)]
    with pytest.raises(ShapeError, match="does not add up"):
        g.add("Split", [x, _c(g, 2, 4)], {"axis": 1}, outputs=2)
    # An impossible even split is only an error if it runs (it may sit in an untaken If branch).
    ys = g.add("Split", [x], {"axis": 1, "num_outputs": 5}, outputs=5)
    assert all(isinstance(_shape(y)[1], str) for y in ys)


# --- references: behaviour the suite does not cover ---------------------------------------------------


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_modes_match_numpy_including_large_pads(mode: str) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    pads = np.array([4, 1, 5, 6])  # larger than the dims: reflect/wrap repeat
    np_mode = {"edge": "edge", "wrap": "wrap", "reflect": "reflect", "constant": "constant"}[mode]
    (y,) = _onnx_run("Pad", {"x": x}, consts={"p": pads}, mode=mode)
    np.testing.assert_array_equal(y, np.pad(x, [(4, 5), (1, 6)], mode=np_mode))


def test_pad_negative_pads_crop_and_axes() -> None:
    x = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    (y,) = _onnx_run("Pad", {"x": x}, consts={"p": np.array([-1, 2, 0, -2]), "v": np.array(9, np.int32),
                                              "a": np.array([2, 0])})
    want = np.pad(x[:, :, 1:], [(2, 0), (0, 0), (0, 0)], constant_values=9)[:-2 or None]
    np.testing.assert_array_equal(y, want)


def test_strings_move_through_data_ops() -> None:
    s = np.array([["b", "a", ""], ["c", "b", "zz"]], dtype=object)
    (y,) = _onnx_run("Gather", {"x": s}, consts={"i": np.array([1, -1])}, axis=1)
    assert y.dtype == object and y.tolist() == [["a", ""], ["b", "zz"]]
    (y,) = _onnx_run("Transpose", {"x": s})
    assert y.tolist() == s.T.tolist()
    y, _, inv, cnt = _onnx_run("Unique", {"x": s}, n_out=4, sorted=0)
    assert y.tolist() == ["b", "a", "", "c", "zz"] and cnt.tolist() == [2, 1, 1, 1, 1]
    np.testing.assert_array_equal(y[inv], s.reshape(-1))
    (y,) = _onnx_run("Pad", {"x": s}, consts={"p": np.array([0, 1, 0, 0])})
    assert y.tolist() == [["", "b", "a", ""], ["", "c", "b", "zz"]]
    (y,) = _onnx_run("Pad", {"x": s}, consts={"p": np.array([0, 0, 0, 1]), "v": np.array("-", dtype=object)})
    assert y.tolist() == [["b", "a", "", "-"], ["c", "b", "zz", "-"]]


@pytest.mark.parametrize("dt", [np.uint16, np.uint32, np.uint64])
def test_unsigned_types(dt: Any) -> None:
    big = np.iinfo(dt).max
    x = np.array([[3, big, 1], [big - 1, 0, 7]], dtype=dt)
    (y,) = _onnx_run("ArgMax", {"x": x}, axis=1, keepdims=0)
    assert y.tolist() == [1, 0]
    v, i = _onnx_run("TopK", {"x": x}, n_out=2, consts={"k": np.array([2])}, axis=1, largest=0)
    assert v.dtype == dt and v.tolist() == [[1, 3], [0, 7]] and i.tolist() == [[2, 0], [1, 2]]
    (y,) = _onnx_run("CumSum", {"x": x}, consts={"a": np.array(1)})
    np.testing.assert_array_equal(y, np.cumsum(x, axis=1, dtype=dt))
    (y,) = _onnx_run("ScatterND", {"x": x, "u": np.array([5, 5], dtype=dt)},
                     consts={"i": np.array([[0, 1], [1, 1]])}, order="xiu", reduction="max", opset=18)
    assert y.tolist() == [[3, big, 1], [big - 1, 5, 7]]
    (y,) = _onnx_run("GatherElements", {"x": x}, consts={"i": np.array([[2, 2], [0, -1]])}, axis=1)
    assert y.dtype == dt and y.tolist() == [[1, 1], [big - 1, 7]]


def test_float8_and_bfloat16_move_exactly() -> None:
    x = np.array([[1.5, -2.0], [0.25, 448.0]], dtype=ml_dtypes.float8_e4m3fn)
    (y,) = _onnx_run("GatherElements", {"x": x}, consts={"i": np.array([[1, 0], [1, 1]])}, axis=1)
    np.testing.assert_array_equal(y.astype(np.float32), [[-2.0, 1.5], [448.0, 448.0]])
    b = np.array([3.0, 1.0, 3.0, 2.0], dtype=ml_dtypes.bfloat16)
    y, _, inv, _ = _onnx_run("Unique", {"x": b}, n_out=4)
    assert y.astype(np.float32).tolist() == [1.0, 2.0, 3.0] and inv.tolist() == [2, 0, 2, 1]


def test_gathernd_batch_dims_and_negative_indices() -> None:
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    idx = np.array([[[0, -1], [2, 1]], [[1, 0], [-1, -4]]])
    (y,) = _onnx_run("GatherND", {"x": data}, consts={"i": idx[..., :1]}, batch_dims=1)
    np.testing.assert_array_equal(y, np.stack([data[b][idx[b, :, 0]] for b in range(2)]))
    (y,) = _onnx_run("GatherND", {"x": data}, consts={"i": idx}, batch_dims=1)
    want = np.stack([[data[b][tuple(i)] for i in idx[b]] for b in range(2)])
    np.testing.assert_array_equal(y, want)


def test_unique_with_axis_unsorted_matches_first_occurrence() -> None:
    x = np.array([[1, 0, 1, 0], [2, 3, 2, 3], [1, 0, 1, 0]], dtype=np.int64)
    y, idx, inv, cnt = _onnx_run("Unique", {"x": x}, n_out=4, axis=1, sorted=0)
    assert y.tolist() == [[1, 0], [2, 3], [1, 0]] and idx.tolist() == [0, 1]
    assert inv.tolist() == [0, 1, 0, 1] and cnt.tolist() == [2, 2]
    y, idx, inv, cnt = _onnx_run("Unique", {"x": x}, n_out=4, axis=1)
    assert y.tolist() == [[0, 1], [3, 2], [0, 1]] and idx.tolist() == [1, 0] and inv.tolist() == [1, 0, 1, 0]


def test_tensor_scatter_circular_wraps() -> None:
    past = np.zeros((2, 1, 4, 1), np.float32)
    upd = np.arange(1, 7, dtype=np.float32).reshape(2, 1, 3, 1)
    (y,) = _onnx_run("TensorScatter", {"p": past, "u": upd}, consts={"w": np.array([2, 0])}, mode="circular",
                     opset=24)
    assert y[:, 0, :, 0].tolist() == [[3, 0, 1, 2], [4, 5, 6, 0]]
    with pytest.raises(ExecutionError, match="exceed"):
        _onnx_run("TensorScatter", {"p": past, "u": upd}, consts={"w": np.array([2, 0])}, opset=24)


def test_dropout_inference_and_seeded_training() -> None:
    x = np.ones((4, 5), np.float32)
    y, m = _onnx_run("Dropout", {"x": x}, n_out=2, opset=13)
    np.testing.assert_array_equal(y, x)
    assert m.dtype == np.bool_ and m.all()
    y, m = _onnx_run("Dropout", {"x": x}, n_out=2, opset=13, seed=3,
                     consts={"r": np.array(0.5, np.float32), "t": np.array(True)})
    _, m2 = _onnx_run("Dropout", {"x": x}, n_out=2, opset=13, seed=3,
                       consts={"r": np.array(0.5, np.float32), "t": np.array(True)})
    np.testing.assert_array_equal(m, m2)  # a seed makes the mask reproducible
    np.testing.assert_array_equal(y, np.where(m, 2.0, 0.0))
    assert 0 < m.sum() < m.size


def test_runtime_errors_name_the_node() -> None:
    with pytest.raises(ExecutionError, match="Gather"):
        _onnx_run("Gather", {"x": np.zeros((2, 3), "f")}, consts={"i": np.array([3])})
    with pytest.raises(ExecutionError, match="Squeeze"):
        g, (x,) = _graph(("n", 2))
        g.outputs = list(g.add("Squeeze", [x, _c(g, 0)]))
        Interpreter(g).run({"x0": np.zeros((3, 2), "f")})


# --- ONNX versions ------------------------------------------------------------------------------------


def test_old_versions_with_attributes() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    (y,) = _onnx_run("Reshape", {"x": x}, opset=1, shape=[4, -1])
    assert y.shape == (4, 6)
    (y,) = _onnx_run("Squeeze", {"x": x[:, :1]}, opset=11, axes=[1])
    assert y.shape == (2, 4)
    (y,) = _onnx_run("Unsqueeze", {"x": x}, opset=1, axes=[0, 4])
    assert y.shape == (1, 2, 3, 4, 1)
    (y,) = _onnx_run("Slice", {"x": x}, opset=1, starts=[1, 0], ends=[INT64_MAX, 2], axes=[1, 2])
    np.testing.assert_array_equal(y, x[:, 1:, :2])
    a, b = _onnx_run("Split", {"x": x}, n_out=2, opset=2, axis=2, split=[1, 3])
    assert a.shape == (2, 3, 1) and b.shape == (2, 3, 3)
    a, b = _onnx_run("Split", {"x": x}, n_out=2, opset=11, axis=2)
    np.testing.assert_array_equal(b, x[:, :, 2:])
    (y,) = _onnx_run("Pad", {"x": x}, opset=1, paddings=[0, 0, 1, 0, 0, 0], value=2.5)
    assert y.shape == (2, 3, 5) and (y[:, :, 0] == 2.5).all()
    (y,) = _onnx_run("Pad", {"x": x}, opset=2, pads=[0, 0, 1, 0, 0, 1], mode="edge")
    np.testing.assert_array_equal(y, np.pad(x, [(0, 0), (0, 0), (1, 1)], mode="edge"))
    v, i = _onnx_run("TopK", {"x": x}, n_out=2, opset=1, k=2)
    np.testing.assert_array_equal(v, x[:, :, ::-1][:, :, :2])
    assert i.dtype == np.int64 and (i == [3, 2]).all()
    (y,) = _onnx_run("Concat", {"a": x, "b": x}, opset=1)
    assert y.shape == (2, 6, 4)  # Concat-1's axis defaults to 1


def test_old_versions_semantics() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y, mask = _onnx_run("Dropout", {"x": x}, n_out=2, opset=7, ratio=0.3)
    np.testing.assert_array_equal(y, x)
    assert mask.dtype == np.float32 and (mask == 1).all()  # Dropout < 10: the mask has the data's type
    y, mask = _onnx_run("Dropout", {"x": x}, n_out=2, opset=6, is_test=1)
    assert mask.dtype == np.float32
    (y,) = _onnx_run("Scatter", {"x": x, "u": np.full((1, 2), 9, np.float32)},
                     consts={"i": np.array([[2, 0]])}, order="xiu", opset=9, axis=1)
    assert y.tolist() == [[9, 1, 9], [3, 4, 5]]
    (y,) = _onnx_run("Tile", {"x": x}, consts={"t": np.array(3), "a": np.array(1)}, opset=1)
    np.testing.assert_array_equal(y, np.tile(x, (1, 3)))


def test_onehot_9_negative_indices_are_off() -> None:
    consts = {"d": np.array(3), "v": np.array([0, 1], np.float32)}
    idx = np.array([0, -1, 2, 5], np.int64)
    (y9,) = _onnx_run("OneHot", {"i": idx}, consts=consts, opset=9, axis=0)
    (y11,) = _onnx_run("OneHot", {"i": idx}, consts=consts, opset=11, axis=0)
    assert y9.T.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert y11.T.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0]]


def test_version_specific_attribute_values_are_rejected() -> None:
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(UnsupportedError, match="wrap"):
        _onnx_run("Pad", {"x": x}, consts={"p": np.array([0, 1, 0, 1])}, opset=18, mode="wrap")
    with pytest.raises(UnsupportedError, match="max"):
        _onnx_run("ScatterElements", {"x": x, "u": x}, consts={"i": np.zeros((2, 3), np.int64)}, order="xiu",
                  opset=16, reduction="max")
    with pytest.raises(UnsupportedError, match="mode"):
        _onnx_run("Pad", {"x": x}, consts={"p": np.array([0, 1, 0, 1])}, mode="mirror")
    with pytest.raises(UnsupportedError, match="not supported"):
        _onnx_run("Reshape", {"x": x}, opset=1, shape=[6], bogus=1)
    with pytest.raises(KilnError, match="equal parts"):
        _onnx_run("Split", {"x": x}, n_out=2, opset=13, axis=1)


def test_expand_shape_built_with_where_equal_keeps_symbols() -> None:
    """Exporters write Expand(x, Where(Equal(shape, -1), 1, shape)); the symbols must survive it."""
    from kiln.ir.ops import OPS

    if "Equal" not in OPS or "Where" not in OPS:
        pytest.skip("needs the elementwise Equal and Where ops")
    g, (x,) = _graph(("b", 1, "s"))
    (s,) = g.add("Shape", [x])
    (n,) = g.add("Shape", [s])
    (ones,) = g.add("ConstantOfShape", [n], {"value": torch.tensor([1])})
    (neg,) = g.add("Mul", [ones, g.add_initializer("m", torch.tensor(-1))])
    (eq,) = g.add("Equal", [s, neg])
    (w,) = g.add("Where", [eq, ones, s])
    assert shape_values(w) == ["b", 1, "s"]
    (y,) = g.add("Expand", [x, w])
    assert _shape(y) == ("b", 1, "s")


@pytest.mark.parametrize("dt", [np.uint16, np.uint64, np.bool_, np.complex64, ml_dtypes.float8_e5m2,
                                np.float16])
def test_one_dim_data_movement_for_dtypes_torch_lacks_kernels_for(dt: Any) -> None:
    x = np.array([0, 1, 1, 0, 1], dtype=np.float32).astype(dt)
    (y,) = _onnx_run("Gather", {"x": x}, consts={"i": np.array([4, -5, 1])})
    np.testing.assert_array_equal(y, x[[4, 0, 1]])
    (y,) = _onnx_run("Compress", {"x": x}, consts={"c": np.array([False, True, False, True])})
    np.testing.assert_array_equal(y, x[[1, 3]])
    (y,) = _onnx_run("Pad", {"x": x}, consts={"p": np.array([2, 7])}, mode="wrap")
    np.testing.assert_array_equal(y, np.pad(x, (2, 7), mode="wrap"))
    y, idx, inv, cnt = _onnx_run("Unique", {"x": x}, n_out=4)
    assert y.dtype == x.dtype and y.tolist() == x[[0, 1]].tolist()
    assert idx.tolist() == [0, 1] and inv.tolist() == [0, 1, 1, 0, 1] and cnt.tolist() == [2, 3]


def test_scatter_add_on_strings_is_rejected() -> None:
    s = np.array(["a", "b"], dtype=object)
    with pytest.raises(ShapeError, match="not defined for strings"):
        _onnx_run("ScatterElements", {"x": s, "u": s[:1]}, consts={"i": np.array([0])}, order="xiu",
                  reduction="add", opset=18)
    c = np.array(["c"], dtype=object)
    (y,) = _onnx_run("ScatterElements", {"x": s, "u": c}, consts={"i": np.array([0])}, order="xiu",
                     reduction="max", opset=18)
    assert y.tolist() == ["c", "b"]
