"""merge_siblings: MatMul / Gemm / Conv siblings on one input with constant weights become one wider op and a
Split (biases merged too); outputs, names and types unchanged."""

from __future__ import annotations

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.merge_siblings import merge_siblings
from tests.passes.pattern_util import ops, rand, rewrite_preserves

F32 = DType.FLOAT32


def _w(g: Graph, *shape: int) -> Value:
    gen = torch.Generator().manual_seed(len(g.initializers))
    return g.add_initializer(g.fresh_name("w"), torch.randn(*shape, generator=gen))


def qkv(*, biases: tuple[bool, ...] = (True, True, True), widths: tuple[int, ...] = (16, 16, 16),
        dynamic_weight: bool = False) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("batch", "seq", 16)))
    outs = []
    for i, (bias, n) in enumerate(zip(biases, widths)):
        w = g.add_input("w_dyn", TensorType(F32, (16, n))) if dynamic_weight and i == 2 else _w(g, 16, n)
        (y,) = g.add("MatMul", [x, w])
        if bias:
            (y,) = g.add("Add", [_w(g, n), y])
        outs.append(y)
    for i, y in enumerate(outs):
        g.rename(y, f"y{i}")
    g.outputs = outs
    return g


X = {"x": rand(2, 5, 16)}


def test_qkv_with_biases() -> None:
    g, res = rewrite_preserves(qkv, merge_siblings, X)
    assert ops(g) == ["MatMul", "Add", "Split"] and res.counts == {"merged_matmuls": 1}
    assert [v.name for v in g.outputs] == ["y0", "y1", "y2"] and g.outputs == g.nodes[2].outputs
    assert sorted(tuple(v.shape) for v in g.initializers.values()) == [(3,), (16, 48), (48,)]


def test_widths_differ_and_biases_partly_missing() -> None:
    def build() -> Graph:
        return qkv(biases=(True, False, True), widths=(8, 16, 4))

    g, _ = rewrite_preserves(build, merge_siblings, X)
    assert ops(g) == ["MatMul", "Split", "Add", "Add"]  # the two biases stay on their parts


def test_dynamic_weight_is_left_out() -> None:
    def build() -> Graph:
        return qkv(dynamic_weight=True)

    g, _ = rewrite_preserves(build, merge_siblings, {**X, "w_dyn": rand(16, 16, seed=4)})
    assert ops(g).count("MatMul") == 2 and "Split" in ops(g)


def test_single_projection_is_unchanged() -> None:
    def build() -> Graph:
        return qkv(biases=(True,), widths=(16,))

    _, res = rewrite_preserves(build, merge_siblings, X)
    assert not res.changed


def test_gemm_siblings() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, ("n", 16)))
        (a,) = g.add("Gemm", [x, _w(g, 8, 16), _w(g, 8)], {"transB": 1}, outputs=["a"])
        (b,) = g.add("Gemm", [x, _w(g, 16, 4)], outputs=["b"])
        (c,) = g.add("Gemm", [x, _w(g, 16, 6), _w(g, 1, 6)], {"beta": 0.5}, outputs=["c"])
        (d,) = g.add("Gemm", [x, _w(g, 16, 6)], {"alpha": 2.0}, outputs=["d"])  # another alpha: not merged
        g.outputs = [a, b, c, d]
        return g

    g, res = rewrite_preserves(build, merge_siblings, {"x": rand(3, 16)})
    assert ops(g) == ["Gemm", "Split", "Gemm"] and res.counts == {"merged_gemms": 1}


def test_conv_siblings() -> None:
    """Three 1x1 branches merge; the 3x3 branch reading the same input does not."""
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, ("n", 4, 6, 6)))
        (a,) = g.add("Conv", [x, _w(g, 3, 4, 3, 3), _w(g, 3)], {"pads": (1, 1, 1, 1)}, outputs=["a"])
        (b,) = g.add("Conv", [x, _w(g, 5, 4, 1, 1), _w(g, 5)], outputs=["b"])
        (c,) = g.add("Conv", [x, _w(g, 2, 4, 1, 1)], outputs=["c"])
        (d,) = g.add("Conv", [x, _w(g, 7, 4, 1, 1), _w(g, 7)], outputs=["d"])
        g.outputs = [a, b, c, d]
        return g

    g, res = rewrite_preserves(build, merge_siblings, {"x": rand(2, 4, 6, 6)})
    assert ops(g) == ["Conv", "Conv", "Split"] and res.counts == {"merged_convs": 1}
    assert g.nodes[1].outputs[0].shape == ("n", 14, 6, 6)


def test_conv_siblings_going_to_different_activations_stay_apart() -> None:
    import torch as _torch

    from kiln.ir import DType, Graph, TensorType
    from kiln.passes.merge_siblings import merge_siblings

    def build(second_relu: bool) -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(DType.FLOAT32, (1, 8, 4, 4)))
        gen = _torch.Generator().manual_seed(0)
        w1 = g.add_initializer("w1", _torch.randn(4, 8, 1, 1, generator=gen))
        w2 = g.add_initializer("w2", _torch.randn(16, 8, 1, 1, generator=gen))
        (a,) = g.add("Conv", [x, w1])
        (b,) = g.add("Conv", [x, w2])
        (ra,) = g.add("Relu", [a])
        rb = g.add("Relu", [b])[0] if second_relu else b
        g.outputs = [ra, rb]
        return g

    apart = build(second_relu=False)
    merge_siblings(apart)
    assert [n.op for n in apart.nodes].count("Conv") == 2  # ResNet's conv1 + Relu beside its downsample conv
    together = build(second_relu=True)
    merge_siblings(together)
    assert [n.op for n in together.nodes].count("Conv") == 1
