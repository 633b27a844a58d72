"""No-op removal: every rewrite case of the pass's table, and the cases that look alike but are not no-ops."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.noops import remove_noops
from tests.passes.cleanup_util import all_ops, ops, preserves, rand

F32 = DType.FLOAT32
X = {"x": rand(2, 3, 4)}


def _unary(op_chain: Callable[[Graph, Value], Value], shape: tuple = (2, 3, 4), dtype: DType = F32) -> Callable[
        [], Graph]:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(dtype, shape))
        out = op_chain(g, x)
        (y,) = g.add("Sigmoid" if dtype.is_float else "Abs", [out], outputs=["y"])
        g.outputs = [y]
        return g

    return build


def _c(g: Graph, value: object, dtype: torch.dtype = torch.float32) -> Value:
    return g.add_initializer("k", torch.tensor(value, dtype=dtype))


NOOPS: dict[str, Callable[[Graph, Value], Value]] = {
    "identity": lambda g, x: g.add("Identity", [x])[0],
    "dropout": lambda g, x: g.add("Dropout", [x, _c(g, 0.3)])[0],
    "dropout_training_ratio_0": lambda g, x: g.add("Dropout", [x, _c(g, 0.0), g.add_initializer(
        "t", torch.tensor(True))])[0],
    "cast": lambda g, x: g.add("Cast", [x], {"to": F32})[0],
    "cast_chain": lambda g, x: g.add("Cast", [g.add("Cast", [x], {"to": DType.FLOAT64})[0]], {"to": F32})[0],
    "reshape": lambda g, x: g.add("Reshape", [x, g.add_initializer("s", torch.tensor([2, 0, -1]))])[0],
    "squeeze_unsqueeze": lambda g, x: g.add("Squeeze", [g.add("Unsqueeze", [x, _c(g, [1], torch.int64)])[0],
                                                        g.add_initializer("a", torch.tensor([1]))])[0],
    "transpose": lambda g, x: g.add("Transpose", [x], {"perm": (0, 1, 2)})[0],
    "transpose_pair": lambda g, x: g.add("Transpose", [g.add("Transpose", [x], {"perm": (2, 0, 1)})[0]],
                                         {"perm": (1, 2, 0)})[0],
    "expand": lambda g, x: g.add("Expand", [x, g.add_initializer("s", torch.tensor([3, 1]))])[0],
    "pad": lambda g, x: g.add("Pad", [x, g.add_initializer("p", torch.zeros(6, dtype=torch.int64))],
                              {"mode": "reflect"})[0],
    "slice": lambda g, x: g.add("Slice", [x, _c(g, [0], torch.int64), g.add_initializer("e", torch.tensor([99])),
                                          g.add_initializer("a", torch.tensor([1]))])[0],
    "tile": lambda g, x: g.add("Tile", [x, g.add_initializer("r", torch.ones(3, dtype=torch.int64))])[0],
    "concat": lambda g, x: g.add("Concat", [x], {"axis": 1})[0],
    "add_zero": lambda g, x: g.add("Add", [_c(g, [0.0, -0.0, 0.0, 0.0]), x])[0],
    "sub_zero": lambda g, x: g.add("Sub", [x, _c(g, 0.0)])[0],
    "mul_one": lambda g, x: g.add("Mul", [x, _c(g, [[1.0], [1.0], [1.0]])])[0],
    "div_one": lambda g, x: g.add("Div", [x, _c(g, 1.0)])[0],
    "pow_one": lambda g, x: g.add("Pow", [x, _c(g, 1, torch.int32)])[0],
    "where": lambda g, x: g.add("Where", [_c(g, [True] * 4, torch.bool), x, g.add_initializer("o", torch.zeros(1))])[0],
}


@pytest.mark.parametrize("case", sorted(NOOPS))
def test_noop_is_removed(case: str) -> None:
    g, _result = preserves(_unary(NOOPS[case]), remove_noops, X)
    assert ops(g) == ["Sigmoid"], case
    assert g.nodes[0].inputs[0] is g.inputs[0]


def test_dropout_in_training_stays() -> None:
    g = _unary(lambda g, x: g.add("Dropout", [x, _c(g, 0.5), g.add_initializer("t", torch.tensor(True))])[0])()
    assert not remove_noops(g).changed and ops(g) == ["Dropout", "Sigmoid"]


NOT_NOOPS: dict[str, Callable[[Graph, Value], Value]] = {
    "lossy_cast_chain": lambda g, x: g.add("Cast", [g.add("Cast", [x], {"to": DType.INT32})[0]], {"to": F32})[0],
    "reversing_slice": lambda g, x: g.add("Slice", [x, _c(g, [-1], torch.int64), g.add_initializer(
        "e", torch.tensor([-99])), g.add_initializer("a", torch.tensor([2])), g.add_initializer(
        "st", torch.tensor([-1]))])[0],
    "pad": lambda g, x: g.add("Pad", [x, g.add_initializer("p", torch.tensor([0, 0, 1, 0, 0, 0]))])[0],
    "broadcast_add_zero": lambda g, x: g.add("Add", [x, _c(g, [[[[0.0]]], [[[0.0]]]])])[0],
    "zero_minus_x": lambda g, x: g.add("Sub", [_c(g, 0.0), x])[0],
    "one_over_x": lambda g, x: g.add("Div", [_c(g, 1.0), x])[0],
    "mul_almost_one": lambda g, x: g.add("Mul", [x, _c(g, [1.0, 1.0, 1.0, 1.0 + 2**-20])])[0],
    "expand_grows": lambda g, x: g.add("Expand", [x, g.add_initializer("s", torch.tensor([2, 1, 1, 1]))])[0],
    "transpose": lambda g, x: g.add("Transpose", [x], {"perm": (0, 2, 1)})[0],
}


@pytest.mark.parametrize("case", sorted(NOT_NOOPS))
def test_lookalike_is_kept(case: str) -> None:
    g, result = preserves(_unary(NOT_NOOPS[case]), remove_noops, X)
    assert not result.changed, case
    assert len(g.nodes) >= 2


def test_an_identity_between_input_and_output_stays() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2,)))
        (y,) = g.add("Identity", [x], outputs=["y"])
        (z,) = g.add("Identity", [y], outputs=["z"])
        g.outputs = [y, z]
        return g

    g, result = preserves(build, remove_noops, {"x": rand(2)})
    assert not result.changed and ops(g) == ["Identity", "Identity"]


def test_an_output_keeps_its_name_and_declared_type() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, ("n", 4)))
        (r,) = g.add("Relu", [x])
        (y,) = g.add("Identity", [r], outputs=["y"])
        g.outputs = [y]
        return g

    g, _ = preserves(build, remove_noops, {"x": rand(3, 4)})
    assert ops(g) == ["Relu"] and g.outputs[0].name == "y" and g.nodes[0].outputs[0] is g.outputs[0]


def test_reshape_chain_becomes_one_reshape() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, ("b", "s", 64)))
        (u,) = g.add("Unsqueeze", [x, g.add_initializer("a", torch.tensor([0]))])
        (f,) = g.add("Flatten", [u], {"axis": 3})  # [b*s, 64]... via [1, b, s, 64]
        (r,) = g.add("Reshape", [f, g.add_initializer("s", torch.tensor([-1, 4, 16]))])
        (y,) = g.add("Relu", [r], outputs=["y"])
        g.outputs = [y]
        return g

    g, result = preserves(build, remove_noops, [{"x": rand(2, 3, 64)}, {"x": rand(1, 5, 64)}])
    assert result.counts == {"reshape_chain": 2} and ops(g) == ["Reshape", "Relu"]
    assert g.nodes[0].inputs[1].data.tolist() == [-1, 4, 16]


def test_transpose_moving_unit_dims_is_a_reshape() -> None:
    g, result = preserves(_unary(lambda g, x: g.add("Transpose", [x], {"perm": (0, 2, 3, 1)})[0], (2, 5, 1, 1)),
                          remove_noops, {"x": rand(2, 5, 1, 1)})
    assert result.counts == {"transpose_to_reshape": 1} and ops(g) == ["Reshape", "Sigmoid"]


def test_transposes_merge() -> None:
    def chain(g: Graph, x: Value) -> Value:
        (t,) = g.add("Transpose", [x], {"perm": (1, 0, 2)})
        return g.add("Transpose", [t], {"perm": (0, 2, 1)})[0]

    g, _result = preserves(_unary(chain), remove_noops, X)
    assert ops(g) == ["Transpose", "Sigmoid"] and g.nodes[0].attrs["perm"] == (1, 2, 0)


def test_bool_neutral_and_integer_ops() -> None:
    def chain(g: Graph, x: Value) -> Value:
        (b,) = g.add("Cast", [x], {"to": DType.BOOL})
        (a,) = g.add("And", [g.add_initializer("t", torch.tensor(True)), b])
        (o,) = g.add("Or", [a, g.add_initializer("f", torch.tensor([False]))])
        (i,) = g.add("Cast", [o], {"to": DType.INT32})
        (w,) = g.add("Cast", [i], {"to": DType.INT64})  # exact: int32 -> int64
        (m,) = g.add("Mul", [w, g.add_initializer("one", torch.tensor(1))])
        return g.add("Cast", [m], {"to": DType.INT32})[0]

    x = np.array([[0, 1, 2], [0, 0, 5]], np.int32)
    g, _ = preserves(_unary(chain, (2, 3), DType.INT32), remove_noops, {"x": x})
    assert ops(g) == ["Cast", "Cast", "Abs"]  # int32 -> bool -> int32


def test_identity_in_a_body_returning_an_outer_value() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2,)))
        c = g.add_input("c", TensorType(DType.BOOL, ()))
        then_g, else_g = Graph("then", parent=g), Graph("else", parent=g)
        (t,) = then_g.add("Identity", [x])
        then_g.outputs = [t]
        (e,) = else_g.add("Neg", [x])
        else_g.outputs = [e]
        (y,) = g.add("If", [c], {"then_branch": then_g, "else_branch": else_g}, outputs=["y"])
        g.outputs = [y]
        return g

    g, _ = preserves(build, remove_noops, [{"x": rand(2), "c": np.array(v)} for v in (True, False)])
    assert all_ops(g) == ["If", "Neg"] and g.nodes[0].attrs["then_branch"].outputs == [g.inputs[0]]


def test_gather_of_every_index_in_order_is_a_reshape() -> None:
    """BERT's exported mask: Flatten(mask) [S, 1] -> Gather(indices 0..S-1 shaped [1, 1, 1, S]) -> Reshape: one
    Reshape, no kernel. Indices out of order, or not all of them, gather for real."""

    def build(indices: torch.Tensor, axis: int = 0) -> Callable[[], Graph]:
        def make() -> Graph:
            g = Graph()
            x = g.add_input("x", TensorType(F32, (6, 1) if axis == 0 else (2, 6)))
            (y,) = g.add("Gather", [x, g.add_initializer("i", indices)], {"axis": axis})
            (z,) = g.add("Relu", [y], outputs=["z"])
            g.outputs = [z]
            return g
        return make

    g, result = preserves(build(torch.arange(6).reshape(1, 1, 1, 6)), remove_noops, [{"x": rand(6, 1)}])
    assert result.counts == {"gather_in_order": 1} and ops(g) == ["Reshape", "Relu"]
    g, result = preserves(build(torch.arange(6).reshape(2, 3), axis=1), remove_noops, [{"x": rand(2, 6)}])
    assert ops(g) == ["Reshape", "Relu"]
    for indices in (torch.tensor([1, 0, 2, 3, 4, 5]), torch.arange(5)):
        g, result = preserves(build(indices), remove_noops, [{"x": rand(6, 1)}])
        assert ops(g) == ["Gather", "Relu"]


def _gathernd(shape: tuple[int, ...], indices: torch.Tensor, batch_dims: int = 0,
              dtype: DType = F32) -> Callable[[], Graph]:
    def make() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(dtype, shape))
        (y,) = g.add("GatherND", [x, g.add_initializer("i", indices)], {"batch_dims": batch_dims})
        (z,) = g.add("Not" if dtype == DType.BOOL else "Relu", [y], outputs=["z"])
        g.outputs = [z]
        return g
    return make


def test_gathernd_of_the_whole_grid_is_a_reshape() -> None:
    """torch.export's `mask[arange(B)[:, None, None, None], arange(S)]` on a [B, S] bool mask: GatherND by the
    [B, 1, 1, S, 2] grid of every (b, s) in order - a Reshape to [B, 1, 1, S], no kernel (GatherND's reference
    kernel cannot be captured in a CUDA graph: the whole BERT engine ran without one)."""
    b, s = 3, 5
    rows, cols = torch.arange(b).reshape(b, 1, 1, 1), torch.arange(s).reshape(1, 1, 1, s)
    grid = torch.stack(torch.broadcast_tensors(rows, cols), -1)
    feeds = [{"x": np.random.default_rng(k).random((b, s)) > 0.5} for k in range(2)]
    g, result = preserves(_gathernd((b, s), grid, dtype=DType.BOOL), remove_noops, feeds)
    assert ops(g) == ["Reshape", "Not"] and result.counts["gathernd_constant"] == 1


@pytest.mark.parametrize("case", ["rows", "elements", "negative", "batch_dims", "empty_k"])
def test_gathernd_by_constant_indices_is_a_gather(case: str) -> None:
    """Any other constant in-range indices: one Gather of the flattened data by constant offsets (negative
    indices wrapped; batch_dims offsets per batch); the values are GatherND's (the op table's reference)."""
    shape, idx, bd = {
        "rows": ((4, 3, 2), torch.tensor([[2], [0], [3]]), 0),
        "elements": ((4, 3, 2), torch.tensor([[[1, 2], [3, 0]], [[0, 0], [2, 1]]]), 0),
        "negative": ((4, 3, 2), torch.tensor([[-1, -3, 1], [0, 2, -2]]), 0),
        "batch_dims": ((2, 4, 3), torch.tensor([[[3], [1]], [[0], [0]]]), 1),
        "empty_k": ((2, 3), torch.zeros(4, 0, dtype=torch.int64), 0),
    }[case]
    g, result = preserves(_gathernd(shape, idx, bd), remove_noops, [{"x": rand(*shape) - 0.5}])
    assert "GatherND" not in ops(g) and result.counts["gathernd_constant"] == 1


def test_gathernd_out_of_range_or_dynamic_stays() -> None:
    """An index out of range keeps the GatherND (its kernel names the error at run time); so do indices that
    are not constant."""
    g = _gathernd((4, 3), torch.tensor([[4, 0]]))()
    result = remove_noops(g)
    assert ops(g) == ["GatherND", "Relu"] and not result.counts
    g = Graph()
    x = g.add_input("x", TensorType(F32, (4, 3)))
    i = g.add_input("i", TensorType(DType.INT64, (2, 2)))
    (y,) = g.add("GatherND", [x, i])
    g.outputs = [y]
    remove_noops(g)
    assert ops(g) == ["GatherND"]
