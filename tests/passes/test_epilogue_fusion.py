"""epilogue_fusion: an anchor (Conv/ConvTranspose/Gemm/MatMul) and its elementwise chain -> Fused[epilogue]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node, Value
from kiln.passes.epilogue_fusion import epilogue_fusion
from tests.passes.same_function import randn, run_checked

F32 = DType.FLOAT32
FEEDS = [{"x": randn(2, 4, 6, 6)}, {"x": randn(1, 4, 6, 6, seed=1)}]


def _w(g: Graph, name: str, *shape: int, seed: int = 0) -> Value:
    return g.add_initializer(name, torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5)


def _conv(g: Graph, x: Value, name: str = "conv", seed: int = 0) -> Value:
    w, b = _w(g, f"{name}.w", 4, 4, 3, 3, seed=seed), _w(g, f"{name}.b", 4, seed=seed + 1)
    return g.add("Conv", [x, w, b], {"pads": (1, 1, 1, 1)}, name=name)[0]


def _graph() -> tuple[Graph, Value]:
    g = Graph()
    return g, g.add_input("x", TensorType(F32, ("N", 4, 6, 6)))


def _fused(g: Graph) -> list[Node]:
    return [n for n in g.nodes if n.op == "Fused"]


def _body(n: Node) -> list[str]:
    return [m.op for m in n.attrs["body"].nodes]


def test_conv_bias_relu_and_residual_add_become_one_epilogue() -> None:
    g, x = _graph()
    (r,) = g.add("Relu", [_conv(g, x)], name="relu1")
    (a,) = g.add("Add", [_conv(g, r, "conv2", seed=2), x], name="add")
    (y,) = g.add("Relu", [a], name="relu2", outputs=["y"])
    g.outputs = [y]
    results = run_checked(g, [epilogue_fusion], FEEDS, rel=0)
    assert results[0].counts == {"epilogues": 2, "steps": 3}
    assert [n.op for n in g.nodes] == ["Fused", "Fused"]
    assert [_body(n) for n in g.nodes] == [["Conv", "Relu"], ["Conv", "Add", "Relu"]]
    assert g.nodes[1].attrs["kind"] == "epilogue" and g.nodes[1].name == "conv2 + add + relu2"
    assert [v.name for v in g.nodes[1].outputs] == ["y"]


def test_residual_from_a_later_independent_branch() -> None:
    """ResNet's downsample: Add(main conv, shortcut conv); the shortcut comes later in node order."""
    g, x = _graph()
    main = _conv(g, x, "main")
    short = _conv(g, x, "short", seed=3)
    (y,) = g.add("Relu", [g.add("Add", [main, short], name="add")[0]], name="relu", outputs=["y"])
    g.outputs = [y]
    run_checked(g, [epilogue_fusion], FEEDS, rel=0)
    assert [n.op for n in g.nodes] == ["Conv", "Fused"] and _body(g.nodes[1]) == ["Conv", "Add", "Relu"]


def test_an_operand_computed_from_the_anchor_is_refused() -> None:
    g, x = _graph()
    c = _conv(g, x)
    (s,) = g.add("Softmax", [c], {"axis": 1})
    g.outputs = [g.add("Add", [c, s], outputs=["y"])[0]]
    assert not epilogue_fusion(g).changed


def test_an_intermediate_read_elsewhere_becomes_an_extra_output() -> None:
    g, x = _graph()
    c = _conv(g, x)
    (p,) = g.add("MaxPool", [c], {"kernel_shape": (2, 2)}, outputs=["pooled"])
    (r,) = g.add("Relu", [c], outputs=["r"])
    g.outputs = [r, p]
    run_checked(g, [epilogue_fusion], FEEDS, rel=0)
    (f,) = _fused(g)
    assert _body(f) == ["Conv", "Relu"] and len(f.outputs) == 2 and g.nodes[-1].op == "MaxPool"


@pytest.mark.parametrize("act", ["Relu", "Sigmoid", "Tanh", "Gelu", "Mish", "HardSwish", "Swish", "Elu"])
def test_matmul_bias_activation_with_symbolic_batch_and_sequence(act: str) -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("B", "S", 8)))
    (m,) = g.add("MatMul", [x, _w(g, "w", 8, 16)], name="mm")
    (b,) = g.add("Add", [_w(g, "bias", 16, seed=1), m], name="bias")
    attrs = {"approximate": "tanh"} if act == "Gelu" else {}
    (y,) = g.add(act, [b], attrs, name="act", outputs=["y"])
    g.outputs = [y]
    feeds = [{"x": randn(2, 3, 8)}, {"x": randn(1, 5, 8, seed=1)}]
    results = run_checked(g, [epilogue_fusion], feeds, rel=0)
    assert results[0].counts == {"linear_bias": 1, "steps": 2}
    (f,) = g.nodes
    assert _body(f) == ["MatMul", "Add", act] and f.outputs[0].shape == ("B", "S", 16)


def test_linear_with_bias_alone_is_one_fused_node() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("M", 8)))
    (m,) = g.add("MatMul", [x, _w(g, "w", 8, 16)])
    g.outputs = [g.add("Add", [m, _w(g, "bias", 1, 16, seed=1)], outputs=["y"])[0]]
    results = run_checked(g, [epilogue_fusion], [{"x": randn(3, 8)}], rel=0)
    assert results[0].counts == {"linear_bias": 1, "steps": 1} and _body(g.nodes[0]) == ["MatMul", "Add"]


def test_a_broadcast_that_would_grow_the_output_is_refused() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (3, 8)))
    big = g.add_input("big", TensorType(F32, (2, 3, 16)))
    (m,) = g.add("MatMul", [x, _w(g, "w", 8, 16)])
    g.outputs = [g.add("Add", [m, big])[0]]
    assert not epilogue_fusion(g).changed


@pytest.mark.parametrize("pattern", ["silu", "hardswish", "mish"])
def test_decomposed_activations_become_one_step(pattern: str) -> None:
    g, x = _graph()
    c = _conv(g, x)
    if pattern == "silu":
        (f,) = g.add("Sigmoid", [c])
    elif pattern == "hardswish":
        (f,) = g.add("HardSigmoid", [c], {"alpha": 1 / 6, "beta": 0.5})
    else:
        (f,) = g.add("Tanh", g.add("Softplus", [c]))
    g.outputs = [g.add("Mul", [c, f], outputs=["y"])[0]]
    results = run_checked(g, [epilogue_fusion], FEEDS, rel=1e-6)
    want = {"silu": "Swish", "hardswish": "HardSwish", "mish": "Mish"}[pattern]
    assert results[0].counts[want.lower()] == 1
    assert [n.op for n in g.nodes] == ["Fused"] and _body(g.nodes[0]) == ["Conv", want]


def test_relu6_clip_leaky_relu_and_sum_residual() -> None:
    g, x = _graph()
    lo, hi = g.add_initializer("lo", torch.tensor(0.0)), g.add_initializer("hi", torch.tensor(6.0))
    (c,) = g.add("Clip", [_conv(g, x), lo, hi])
    (s,) = g.add("Sum", [x, c])
    (y,) = g.add("LeakyRelu", [s], {"alpha": 0.1}, outputs=["y"])
    g.outputs = [y]
    run_checked(g, [epilogue_fusion], FEEDS, rel=0)
    assert [_body(n) for n in g.nodes] == [["Conv", "Clip", "Sum", "LeakyRelu"]]


def test_gemm_conv_transpose_and_a_cast_epilogue() -> None:
    g = Graph()
    a = g.add_input("a", TensorType(F32, ("M", 8)))
    (y,) = g.add("Gemm", [a, _w(g, "w", 16, 8), _w(g, "c", 16, seed=1)], {"transB": 1})
    (h,) = g.add("Cast", [g.add("Relu", [y])[0]], {"to": DType.FLOAT16}, outputs=["h"])
    x = g.add_input("x", TensorType(F32, ("N", 4, 5, 5)))
    (t,) = g.add("ConvTranspose", [x, _w(g, "wt", 4, 3, 2, 2, seed=2)], {"strides": (2, 2)})
    (z,) = g.add("Sigmoid", [t], outputs=["z"])
    g.outputs = [h, z]
    run_checked(g, [epilogue_fusion], [{"a": randn(3, 8), "x": randn(2, 4, 5, 5)}], rel=0)
    assert [_body(n) for n in g.nodes] == [["Gemm", "Relu", "Cast"], ["ConvTranspose", "Sigmoid"]]


def test_no_cycle_between_two_epilogues_through_extra_outputs() -> None:
    """a -> r1 (also read by n1); b -> r2 (also read by n2); Add(r1, n2) after a and Add(r2, n1) after b: the
    second epilogue must not take an operand that now comes out of the first fused node's region."""
    g, x = _graph()
    r1 = g.add("Relu", [_conv(g, x, "a")], name="r1")[0]
    r2 = g.add("Relu", [_conv(g, x, "b", seed=2)], name="r2")[0]
    n1 = g.add("Softmax", [r1], {"axis": 1}, name="n1")[0]
    n2 = g.add("Softmax", [r2], {"axis": 1}, name="n2")[0]
    y1 = g.add("Add", [r1, n2], name="add1", outputs=["y1"])[0]
    y2 = g.add("Add", [r2, n1], name="add2", outputs=["y2"])[0]
    g.outputs = [y1, y2]
    run_checked(g, [epilogue_fusion], FEEDS, rel=0)
    assert sum(len(n.attrs["body"].nodes) for n in _fused(g)) < 6  # one of the Adds stays outside


def test_integer_matmul_and_unknown_ops_are_left_alone() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(DType.INT32, (3, 4)))
    (m,) = g.add("MatMul", [x, g.add_initializer("w", torch.ones(4, 2, dtype=torch.int32))])
    g.outputs = [g.add("Relu", [m])[0]]
    assert not epilogue_fusion(g).changed


def test_fuses_inside_subgraphs() -> None:
    g, x = _graph()
    cond = g.add_input("cond", TensorType(DType.BOOL, ()))
    then = Graph("then", parent=g)
    then.outputs = [then.add("Relu", [_conv(then, x)])[0]]
    other = Graph("else", parent=g)
    other.outputs = [other.add("Neg", [_conv(other, x, "c2")])[0]]
    g.outputs = [g.add("If", [cond], {"then_branch": then, "else_branch": other}, outputs=["y"])[0]]
    feeds = [{"x": randn(2, 4, 6, 6), "cond": np.array(c)} for c in (True, False)]
    run_checked(g, [epilogue_fusion], feeds, rel=0)
    assert [_body(n) for n in then.nodes] == [["Conv", "Relu"]] and [_body(n) for n in other.nodes] == [["Conv", "Neg"]]


def test_an_activation_on_every_part_of_a_split_joins_the_merged_anchor() -> None:
    """Sibling Convs merged into one wider Conv + Split, each part with the same Relu (and Clip bounds)."""
    g, x = _graph()
    w, b = _w(g, "w", 8, 4, 1, 1), _w(g, "b", 8, seed=1)
    (c,) = g.add("Conv", [x, w, b], name="merged")
    lo, hi = g.add_initializer("lo", torch.tensor(0.0)), g.add_initializer("hi", torch.tensor(6.0))
    parts = g.add("Split", [c, g.add_initializer("sizes", torch.tensor([3, 5]))], {"axis": 1}, outputs=2)
    g.outputs = [g.add("Clip", [p, lo, hi], outputs=[f"y{i}"])[0] for i, p in enumerate(parts)]
    results = run_checked(g, [epilogue_fusion], FEEDS, rel=0)
    assert results[0].counts["hoisted_through_split"] == 1
    assert [n.op for n in g.nodes] == ["Fused", "Split"] and _body(g.nodes[0]) == ["Conv", "Clip"]
    assert [v.name for v in g.outputs] == ["y0", "y1"]


def test_different_activations_after_a_split_stay() -> None:
    g, x = _graph()
    parts = g.add("Split", [_conv(g, x)], {"axis": 1, "num_outputs": 2}, outputs=2)
    g.outputs = [g.add("Relu", [parts[0]])[0], g.add("Sigmoid", [parts[1]])[0]]
    assert not epilogue_fusion(g).changed


def test_a_chain_ending_at_a_model_output_joins_after_static_dims_are_substituted() -> None:
    """BERT's pooler: Gemm -> Tanh -> model output. With the profile's batch static, every value's type says 1 but
    the model output keeps its declared `batch`; the Tanh still joins (one kernel, not two)."""
    from kiln.passes.manager import PassContext
    from kiln.passes.shape_arithmetic import shape_arithmetic

    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", 8)))
    y = g.add("Gemm", [x, _w(g, "w", 6, 8), _w(g, "b", 6, seed=1)], {"transB": 1}, name="dense")[0]
    out = g.add("Tanh", [y], name="act")[0]
    g.outputs.append(out)
    shape_arithmetic(PassContext(static_dims={"batch": 1}))(g)
    assert y.shape == (1, 6) and out.shape == ("batch", 6)
    feeds = [{"x": randn(1, 8)}]
    run_checked(g, [epilogue_fusion], feeds)
    (node,) = _fused(g)
    assert _body(node) == ["Gemm", "Tanh"] and len(g.nodes) == 1


# --- extend_epilogues: steps that appear after fusion (FP16 lowering's output casts) -------------------------


def _mm_bias(g: Graph, x: Value) -> Value:
    y = g.add("MatMul", [x, _w(g, "w", 8, 6)], name="mm")[0]
    return g.add("Add", [y, _w(g, "b", 6, seed=1)], name="bias")[0]


def test_a_cast_after_an_epilogue_joins_it_and_a_bare_anchor_gets_one() -> None:
    from kiln.passes.epilogue_fusion import extend_epilogues

    g = Graph()
    x = g.add_input("x", TensorType(F32, (3, 8)))
    g.outputs.append(_mm_bias(g, x))
    epilogue_fusion(g)
    (fused,) = _fused(g)
    cast = g.add("Cast", [fused.outputs[0]], {"to": DType.FLOAT16}, name="to_half")[0]
    g.outputs[0] = cast
    bare = g.add("Gemm", [x, _w(g, "w2", 5, 8, seed=2)], {"transB": 1}, name="fc")[0]
    g.outputs.append(g.add("Cast", [bare], {"to": DType.FLOAT16}, name="fc_half")[0])
    results = run_checked(g, [extend_epilogues], [{"x": randn(3, 8)}], rel=0.0)
    assert results[0].counts == {"steps": 2}
    assert sorted(_body(n) for n in _fused(g)) == [["Gemm", "Cast"], ["MatMul", "Add", "Cast"]] and len(g.nodes) == 2
    assert all(n.outputs[0].dtype is DType.FLOAT16 for n in g.nodes)


def test_a_step_whose_input_is_read_elsewhere_stays_out() -> None:
    from kiln.passes.epilogue_fusion import extend_epilogues

    g = Graph()
    x = g.add_input("x", TensorType(F32, (3, 8)))
    y = _mm_bias(g, x)
    g.outputs.append(y)
    epilogue_fusion(g)
    (fused,) = _fused(g)
    g.outputs.append(g.add("Cast", [fused.outputs[0]], {"to": DType.FLOAT16}, name="to_half")[0])
    assert not extend_epilogues(g).changed and [n.op for n in g.nodes] == ["Fused", "Cast"]
