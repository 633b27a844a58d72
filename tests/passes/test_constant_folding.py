"""Constant folding: Constant nodes and constant subgraphs become initializers of the exact dtype; random ops,
DequantizeLinear of weights and large broadcasts stay; If on a constant condition is replaced by its branch."""

from __future__ import annotations

import numpy as np
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.passes.constant_folding import fold_constants
from kiln.passes.dead_nodes import dead_nodes
from tests.passes.cleanup_util import all_ops, ops, preserves, rand

F32 = DType.FLOAT32


def _weight_prep() -> Graph:
    """y = x @ Transpose(Reshape(Cast(w16))) + Constant: the weight path is all constant."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("N", 6)))
    w = g.add_initializer("w", torch.arange(24, dtype=torch.float16).reshape(2, 12) / 8)
    (c,) = g.add("Cast", [w], {"to": F32})
    (shape,) = g.add("Constant", [], {"value": torch.tensor([4, 6])})
    (r,) = g.add("Reshape", [c, shape])
    (t,) = g.add("Transpose", [r], {"perm": (1, 0)})
    (b,) = g.add("Constant", [], {"value": torch.ones(4)})
    (m,) = g.add("MatMul", [x, t])
    (y,) = g.add("Add", [m, b], outputs=["y"])
    g.outputs = [y]
    return g


def test_weight_preprocessing_folds_to_initializers() -> None:
    g, result = preserves(_weight_prep, [fold_constants, dead_nodes], {"x": rand(3, 6)})
    assert result.counts["constants"] == 2 and result.counts["folded"] == 3
    assert ops(g) == ["MatMul", "Add"]
    (t,) = [v for v in g.initializers.values() if v.shape == (6, 4)]
    assert t.dtype is F32 and t.data.is_contiguous()


def test_folded_values_keep_their_names_and_do_not_share_memory() -> None:
    g = Graph()
    w = g.add_initializer("w", torch.arange(6.0))
    (r,) = g.add("Reshape", [w, g.add_initializer("s", torch.tensor([2, 3]))], outputs=["r"])
    g.outputs = [r]
    fold_constants(g)
    assert g.nodes == [] and g.initializers["r"] is r and r.shape == (2, 3)
    assert r.data.untyped_storage().data_ptr() != w.data.untyped_storage().data_ptr()


def test_narrow_and_string_dtypes_are_kept() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(DType.INT8, (4,)))
        (c4,) = g.add("Cast", [g.add_initializer("k", torch.tensor([1.0, -3.0, 7.0, 9.0]))], {"to": DType.INT4})
        (c8,) = g.add("Cast", [c4], {"to": DType.INT8})
        (y,) = g.add("Add", [x, c8], outputs=["y"])
        (s,) = g.add("Constant", [], {"value": np.array(["a", "bc"], dtype=object)})
        (t,) = g.add("Identity", [s], outputs=["t"])
        g.outputs = [y, t]
        return g

    g, _ = preserves(build, fold_constants, {"x": np.arange(4, dtype=np.int8)})
    assert ops(g) == ["Add"]
    assert g.initializers["t"].dtype is DType.STRING and list(g.initializers["t"].data) == ["a", "bc"]
    (narrow,) = [v for v in g.initializers.values() if v.dtype is DType.INT4]
    assert narrow.data.tolist() == [1, -3, 7, -7]  # 9 wraps in int4; stored widened in int8


def test_random_ops_and_weight_dequantization_stay() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (4,)))
    w = g.add_initializer("w", torch.tensor([0.5, -1.0, 2.0, 0.25]))
    scale = g.add_initializer("scale", torch.tensor(0.05))
    zero = g.add_initializer("zp", torch.tensor(0, dtype=torch.int8))
    (q,) = g.add("QuantizeLinear", [w, scale, zero])
    (dq,) = g.add("DequantizeLinear", [q, scale, zero])
    (noise,) = g.add("RandomNormalLike", [w])
    (a,) = g.add("Add", [x, dq])
    (y,) = g.add("Add", [a, noise], outputs=["y"])
    g.outputs = [y]
    result = fold_constants(g)
    assert result.counts["folded"] == 1  # the QuantizeLinear of the weight only
    assert ops(g) == ["DequantizeLinear", "RandomNormalLike", "Add", "Add"]
    assert g.nodes[0].inputs[0].dtype is DType.INT8


def test_large_broadcasts_are_not_materialized() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (512, 512)))
    (shape,) = g.add("Constant", [], {"value": torch.tensor([512, 512])})
    (big,) = g.add("ConstantOfShape", [shape], {"value": torch.tensor([2.0])})
    (small,) = g.add("ConstantOfShape", [g.add_initializer("s", torch.tensor([8]))], {"value": torch.tensor([1.0])})
    (e,) = g.add("Expand", [g.add_initializer("one", torch.tensor(3.0)), shape])
    (a,) = g.add("Mul", [x, big])
    (b,) = g.add("Add", [a, e])
    (y,) = g.add("Sub", [b, g.add("ReduceSum", [small])[0]], outputs=["y"])
    g.outputs = [y]
    fold_constants(g)
    dead_nodes(g)
    assert ops(g) == ["ConstantOfShape", "Expand", "Mul", "Add", "Sub"]


def test_shape_of_static_dims_folds_without_a_profile() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, ("N", 3, 8)))
        (sh,) = g.add("Shape", [x])
        (d,) = g.add("Gather", [sh, g.add_initializer("i", torch.tensor([1, 2]))])
        (n,) = g.add("Gather", [sh, g.add_initializer("i0", torch.tensor([0]))])
        (t,) = g.add("Concat", [n, d], {"axis": 0})
        (y,) = g.add("Reshape", [x, t], outputs=["y"])
        (z,) = g.add("Cast", [d], {"to": DType.INT32}, outputs=["z"])
        g.outputs = [y, z]
        return g

    g, _ = preserves(build, [fold_constants, dead_nodes], [{"x": rand(2, 3, 8)}, {"x": rand(5, 3, 8)}])
    assert sorted(ops(g)) == ["Concat", "Gather", "Reshape", "Shape"]
    assert g.initializers["z"].dtype is DType.INT32 and g.initializers["z"].data.tolist() == [3, 8]


def _if_model(cond_value: bool) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 3)))
    (cond,) = g.add("Not", [g.add_initializer("c", torch.tensor(not cond_value))])
    then_g = Graph("then", parent=g)
    (t,) = then_g.add("Relu", [x])
    then_g.outputs = [t]
    else_g = Graph("else", parent=g)
    (e,) = else_g.add("Neg", [x])
    (e2,) = else_g.add("Mul", [e, else_g.add_initializer("two", torch.tensor(2.0))])
    else_g.outputs = [e2]
    (y,) = g.add("If", [cond], {"then_branch": then_g, "else_branch": else_g}, outputs=["y"])
    g.outputs = [y]
    return g


def test_if_on_a_constant_condition_becomes_its_branch() -> None:
    g, result = preserves(lambda: _if_model(True), fold_constants, {"x": rand(2, 3)})
    assert result.counts["branches_inlined"] == 1 and ops(g) == ["Relu"] and g.outputs[0].name == "y"
    g, _ = preserves(lambda: _if_model(False), fold_constants, {"x": rand(2, 3)})
    assert ops(g) == ["Neg", "Mul"] and "two" in g.initializers


def test_if_branch_returning_an_input_keeps_the_output_name() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2,)))
        then_g, else_g = Graph("then", parent=g), Graph("else", parent=g)
        then_g.outputs = [x]
        (n,) = else_g.add("Neg", [x])
        else_g.outputs = [n]
        (y,) = g.add("If", [g.add_initializer("c", torch.tensor(True))],
                     {"then_branch": then_g, "else_branch": else_g}, outputs=["y"])
        g.outputs = [y]
        return g

    g, _ = preserves(build, fold_constants, {"x": rand(2)})
    assert ops(g) == ["Identity"]


def test_constants_inside_bodies_fold_into_the_body() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2,)))
        c = g.add_input("c", TensorType(DType.BOOL, ()))
        then_g, else_g = Graph("then", parent=g), Graph("else", parent=g)
        (k,) = then_g.add("Constant", [], {"value": torch.tensor([1.0, 2.0])})
        (k2,) = then_g.add("Mul", [k, k])
        (t,) = then_g.add("Add", [x, k2])
        then_g.outputs = [t]
        else_g.outputs = [x]
        (y,) = g.add("If", [c], {"then_branch": then_g, "else_branch": else_g}, outputs=["y"])
        g.outputs = [y]
        return g

    feeds = [{"x": rand(2), "c": np.array(v)} for v in (True, False)]
    g, result = preserves(build, fold_constants, feeds)
    assert result.counts == {"constants": 1, "folded": 1, "branches_inlined": 0}
    assert all_ops(g) == ["If", "Add"] and len(g.nodes[0].attrs["then_branch"].initializers) == 2


def test_readers_of_an_inlined_if_learn_the_branch_type() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2, 3)))
        then_g, else_g = Graph("then", parent=g), Graph("else", parent=g)
        (t,) = then_g.add("Neg", [x])
        then_g.outputs = [t]
        (e,) = else_g.add("Reshape", [x, else_g.add_initializer("s", torch.tensor([6]))])
        else_g.outputs = [e]
        (i,) = g.add("If", [g.add_input("c", TensorType(DType.BOOL, ()))],
                     {"then_branch": then_g, "else_branch": else_g})
        (r,) = g.add("Relu", [i])
        (y,) = g.add("Sigmoid", [r], outputs=["y"])
        g.outputs = [y]
        g.inputs = g.inputs[:1]  # the condition becomes a constant below
        g.nodes[0].inputs = [g.add_initializer("c0", torch.tensor(True))]
        return g

    g = build()
    assert g.nodes[1].outputs[0].type.shape is None  # the branches disagree on the rank
    g, _ = preserves(build, fold_constants, {"x": rand(2, 3)})
    assert ops(g) == ["Neg", "Relu", "Sigmoid"] and g.nodes[1].outputs[0].type.shape == (2, 3)
    assert g.outputs[0].type.shape is None  # the model's output keeps its declared type


def test_a_weight_is_folded_whatever_its_size_a_large_broadcast_is_not() -> None:
    import torch as _torch

    from kiln.ir import DType, Graph, TensorType
    from kiln.passes.constant_folding import fold_constants

    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, (1, 64, 8, 8)))
    shape = g.add_initializer("wshape", _torch.tensor([512, 64, 3, 3]))
    (w,) = g.add("ConstantOfShape", [shape], {"value": _torch.tensor([0.01])})  # 295k elements: a Conv weight
    (c,) = g.add("Conv", [x, w], {"pads": (1, 1, 1, 1)})
    big = g.add_initializer("bshape", _torch.tensor([4, 512, 8, 8]))
    (b,) = g.add("ConstantOfShape", [big], {"value": _torch.tensor([1.0])})  # 131k elements: a broadcast
    (y,) = g.add("Add", [c, b])
    g.outputs = [y]
    fold_constants(g)
    assert [n.op for n in g.nodes] == ["Conv", "ConstantOfShape", "Add"]
    assert g.nodes[0].inputs[1].data is not None and g.nodes[0].inputs[1].data.shape == (512, 64, 3, 3)
