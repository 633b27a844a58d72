"""fold_affine: BatchNormalization and per-channel Mul/Add folded into the weights of Conv/ConvTranspose/Gemm/MatMul."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.dead_nodes import dead_nodes
from kiln.passes.fold_affine import fold_affine
from tests.passes.same_function import randn, run_checked

F32 = DType.FLOAT32


def _t(*shape: int, seed: int = 1, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * (hi - lo) + lo


def _bn(g: Graph, x: Value, c: int, name: str = "bn", **attrs: object) -> Value:
    params = [g.add_initializer(f"{name}.{k}", _t(c, seed=i + 10, lo=lo, hi=hi))
              for i, (k, lo, hi) in enumerate([("scale", 0.5, 2), ("b", -1, 1), ("mean", -1, 1), ("var", 0.1, 2)])]
    (y,) = g.add("BatchNormalization", [x, *params], {"epsilon": 1e-3, **attrs}, name=name, outputs=["y"])
    return y


def _ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def _conv_graph(bias: bool = True, group: int = 1, transpose: bool = False, dtype: DType = F32) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(dtype, ("N", 4, 6, 6)))
    w_shape = (4, 6 // group, 3, 3) if transpose else (6, 4 // group, 3, 3)
    w = g.add_initializer("w", _t(*w_shape, seed=2).to(dtype.torch))
    b = g.add_initializer("b", _t(6, seed=3).to(dtype.torch)) if bias else None
    op = "ConvTranspose" if transpose else "Conv"
    (c,) = g.add(op, [x, w, b], {"pads": (1, 1, 1, 1), "group": group}, name="conv")
    g.outputs = [_bn(g, c, 6)]
    return g


FEEDS = [{"x": randn(2, 4, 6, 6)}, {"x": randn(3, 4, 6, 6, seed=1)}]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("transpose", [False, True])
def test_batchnorm_folds_into_conv_and_conv_transpose(bias: bool, group: int, transpose: bool) -> None:
    g = _conv_graph(bias, group, transpose)
    results = run_checked(g, [fold_affine, dead_nodes], FEEDS)
    assert results[0].counts == {"batchnorm_folded": 1}
    assert _ops(g) == ["ConvTranspose" if transpose else "Conv"]
    assert g.outputs[0].name == "y" and len(g.nodes[0].inputs) == 3
    assert set(g.initializers) == {"conv.w_folded", "conv.b_folded"}


def test_folded_weights_keep_a_half_dtype() -> None:
    g = _conv_graph(dtype=DType.FLOAT16)
    g.nodes[1].inputs[1:] = [g.add_initializer(f"p{i}", v.data.half()) for i, v in enumerate(g.nodes[1].inputs[1:])]
    run_checked(g, [fold_affine], [{k: v.astype("float16") for k, v in f.items()} for f in FEEDS], rel=5e-3)
    assert _ops(g) == ["Conv"] and all(v.dtype is DType.FLOAT16 for v in g.nodes[0].inputs[1:] if v)


def _gemm_graph(trans_b: int, c_shape: tuple[int, ...] | None, alpha: float = 1.0, beta: float = 1.0) -> Graph:
    g = Graph()
    a = g.add_input("a", TensorType(F32, ("M", 5)))
    w = g.add_initializer("w", _t(*((3, 5) if trans_b else (5, 3)), seed=4))
    c = None if c_shape is None else g.add_initializer("c", _t(*c_shape, seed=5))
    (y,) = g.add("Gemm", [a, w, c], {"transB": trans_b, "alpha": alpha, "beta": beta}, name="gemm")
    g.outputs = [_bn(g, y, 3)]
    return g


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("c_shape", "beta"), [(None, 1.0), ((3,), 1.0), ((), 0.5), ((1, 3), 2.0), ((4, 3), 1.0),
                                               ((3,), 0.0)])
def test_batchnorm_folds_into_gemm(trans_b: int, c_shape: tuple[int, ...] | None, beta: float) -> None:
    g = _gemm_graph(trans_b, c_shape, alpha=0.7, beta=beta)
    feeds = [{"a": randn(4, 5)}]
    run_checked(g, [fold_affine], feeds)
    assert _ops(g) == ["Gemm"] and g.nodes[0].attrs["beta"] == 1.0


def test_batchnorm_after_a_2d_matmul_becomes_matmul_plus_bias() -> None:
    g = Graph()
    a = g.add_input("a", TensorType(F32, ("M", 5)))
    (y,) = g.add("MatMul", [a, g.add_initializer("w", _t(5, 3, seed=4))], name="mm")
    g.outputs = [_bn(g, y, 3)]
    results = run_checked(g, [fold_affine], [{"a": randn(4, 5)}])
    assert results[0].counts == {"batchnorm_folded": 1} and _ops(g) == ["MatMul", "Add"]
    assert g.nodes[1].inputs[1] is not None and g.nodes[1].inputs[1].shape == (3,)


def test_batchnorm_after_a_3d_matmul_is_decomposed() -> None:
    """BN normalizes axis 1; a [B, S, N] MatMul's channels are the last axis: no fold, Mul + Add instead."""
    g = Graph()
    a = g.add_input("a", TensorType(F32, ("B", 3, 5)))
    (y,) = g.add("MatMul", [a, g.add_initializer("w", _t(5, 4, seed=4))], name="mm")
    g.outputs = [_bn(g, y, 3)]
    results = run_checked(g, [fold_affine], [{"a": randn(2, 3, 5)}])
    assert results[0].counts == {"batchnorm_decomposed": 1} and _ops(g) == ["MatMul", "Mul", "Add"]
    assert g.nodes[1].inputs[1] is not None and g.nodes[1].inputs[1].shape == (3, 1)


def test_an_anchor_read_elsewhere_keeps_its_weights() -> None:
    g = _conv_graph()
    g.outputs.append(g.nodes[0].outputs[0])
    results = run_checked(g, [fold_affine], FEEDS)
    assert results[0].counts == {"batchnorm_decomposed": 1} and _ops(g) == ["Conv", "Mul", "Add"]


def test_training_mode_batchnorm_is_left_alone() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 6, 4)))
    g.outputs = [_bn(g, x, 6, training_mode=1)]
    assert not fold_affine(g).changed


def _conv_then(op: str, const_shape: tuple[int, ...], const_first: bool = False, bias: bool = True) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("N", 4, 6, 6)))
    w = g.add_initializer("w", _t(6, 4, 3, 3, seed=2))
    b = g.add_initializer("b", _t(6, seed=3)) if bias else None
    (c,) = g.add("Conv", [x, w, b], {"pads": (1, 1, 1, 1)}, name="conv")
    k = g.add_initializer("k", _t(*const_shape, seed=6, lo=0.5, hi=2.0))
    (y,) = g.add(op, [k, c] if const_first else [c, k], name="op", outputs=["y"])
    g.outputs = [y]
    return g


@pytest.mark.parametrize("op", ["Mul", "Div", "Add", "Sub"])
@pytest.mark.parametrize("shape", [(6, 1, 1), (1, 6, 1, 1), (), (1,)])
@pytest.mark.parametrize("bias", [True, False])
def test_per_channel_constants_fold_into_conv(op: str, shape: tuple[int, ...], bias: bool) -> None:
    g = _conv_then(op, shape, bias=bias)
    results = run_checked(g, [fold_affine], FEEDS)
    assert results[0].counts == {("scale_folded" if op in ("Mul", "Div") else "offset_folded"): 1}
    assert _ops(g) == ["Conv"] and g.outputs[0].name == "y"


@pytest.mark.parametrize(("op", "shape", "first"), [
    ("Mul", (1, 6, 1), False),  # broadcasts along H as well
    ("Mul", (6,), False),  # [6] aligns with W, not the channels
    ("Add", (1, 1, 6, 1, 1), False),  # would grow the output's rank
    ("Sub", (6, 1, 1), True),  # c - conv: not an offset
    ("Div", (6, 1, 1), True),
])
def test_constants_that_are_not_per_channel_stay(op: str, shape: tuple[int, ...], first: bool) -> None:
    g = _conv_then(op, shape, first)
    assert not fold_affine(g).changed


def test_offset_folds_into_gemm_bias_but_a_matmul_bias_stays_an_add() -> None:
    g = Graph()
    a = g.add_input("a", TensorType(F32, ("M", 5)))
    (y,) = g.add("Gemm", [a, g.add_initializer("w", _t(3, 5, seed=4))], {"transB": 1}, name="gemm")
    (z,) = g.add("Add", [y, g.add_initializer("bias", _t(3, seed=5))], name="add")
    (m,) = g.add("MatMul", [z, g.add_initializer("w2", _t(3, 2, seed=6))], name="mm")
    (s,) = g.add("Mul", [m, g.add_initializer("s", _t(2, seed=7))], name="scale")
    (o,) = g.add("Add", [s, g.add_initializer("o", _t(2, seed=8))], name="offset", outputs=["out"])
    g.outputs = [o]
    results = run_checked(g, [fold_affine], [{"a": randn(4, 5)}])
    assert results[0].counts == {"offset_folded": 1, "scale_folded": 1}
    assert _ops(g) == ["Gemm", "MatMul", "Add"] and g.outputs[0].name == "out"


def test_folds_inside_subgraphs() -> None:
    g = _conv_graph()
    conv, bn = g.nodes[0], g.nodes[1]
    cond = g.add_input("cond", TensorType(DType.BOOL, ()))
    g.nodes = []
    then = Graph("then", parent=g)
    then.nodes, then.outputs = [conv, bn], [bn.outputs[0]]
    other = Graph("else", parent=g)
    (c2,) = other.add("Conv", list(conv.inputs), {"pads": (1, 1, 1, 1)})
    other.outputs = [other.add("Neg", [c2])[0]]
    (y,) = g.add("If", [cond], {"then_branch": then, "else_branch": other}, outputs=["out"])
    g.outputs = [y]
    feeds = [{"x": randn(2, 4, 6, 6), "cond": np.array(c)} for c in (True, False)]
    results = run_checked(g, [fold_affine], feeds)
    assert results[0].counts == {"batchnorm_folded": 1} and [n.op for n in then.nodes] == ["Conv"]
